"""Configure the monitors from YAML or the command line with ``LightningCLI``.

    python examples/cli.py fit --config examples/curvature_config.yaml
    python examples/cli.py fit --config examples/curvature_config.yaml --trainer.max_steps=200
    python examples/cli.py fit --config examples/curvature_config.yaml \
        --trainer.callbacks+=lightning_curvature.SAM --trainer.callbacks.rho=0.02

Every callback of ``lightning_curvature`` is an ordinary ``trainer.callbacks`` entry with
``class_path`` and ``init_args``; ``--print_config`` shows all their arguments.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from edge_of_stability import DigitsRegressor, digits_dataset


class DigitsData(pl.LightningDataModule):
    """Scikit-learn's bundled digits, served as one full batch (gradient descent)."""

    def __init__(self, num_examples: int = 1000) -> None:
        super().__init__()
        self.num_examples = num_examples

    def train_dataloader(self) -> DataLoader:
        dataset = digits_dataset(self.num_examples)
        return DataLoader(dataset, batch_size=len(dataset))


def main(args: list[str] | None = None) -> LightningCLI:
    """Run the CLI (``args`` as on the command line; ``None`` reads ``sys.argv``)."""
    return LightningCLI(DigitsRegressor, DigitsData, args=args)


if __name__ == "__main__":
    main()
