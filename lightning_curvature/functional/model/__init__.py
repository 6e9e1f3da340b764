"""The model as a function of its measured parameters.

Which parameters, on what batches, under which probe conditions.
"""
