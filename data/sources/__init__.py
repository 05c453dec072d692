"""The converters of data/prepare_datasets.py, one module per dataset, over common.py."""
