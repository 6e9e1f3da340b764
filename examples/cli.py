"""Configure the monitors from YAML or the command line with ``LightningCLI``.

    python examples/cli.py fit --config examples/curvature_config.yaml
    python examples/cli.py fit --config examples/curvature_config.yaml --trainer.max_steps=200
    python examples/cli.py fit --config examples/curvature_config.yaml \
        --trainer.callbacks+=lightning_curvature.SAM --trainer.callbacks.rho=0.02

Every callback of ``lightning_curvature`` is an ordinary ``trainer.callbacks`` entry with
``class_path`` and ``init_args``; ``--print_config`` shows all their arguments. After ``fit``
it reads the sharpness back from the event file and prints a ``CONCLUSION:`` line.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.cli import LightningCLI
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import read_scalars, tensorboard_hint
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
    cli = LightningCLI(DigitsRegressor, DigitsData, args=args)
    log_dir = getattr(cli.trainer.logger, "log_dir", None)
    if cli.subcommand == "fit" and log_dir is not None:
        ours = [type(c).__name__ for c in cli.trainer.callbacks]
        conclude(log_dir, [n for n in ours if n.endswith("Monitor") or n == "SAM"])
    return cli


def conclude(log_dir: str, callbacks: list[str]) -> None:
    """Print what the configured monitors logged, read back from the event file."""
    ratio = read_scalars(log_dir, "curvature/sharpness_ratio")
    first, last = ratio[0], ratio[-1]
    print(
        f"CONCLUSION: the config built {', '.join(callbacks)}; the sharpness ratio "
        f"λ₁ / (2/lr) went from {first[1]:.3f} at step {first[0]} to {last[1]:.3f} at step "
        f"{last[0]} over {len(ratio)} probes."
    )
    print(f"TensorBoard logs in {log_dir}: {tensorboard_hint(log_dir)}")


if __name__ == "__main__":
    main()
