"""assay.curation: the dataset format, readers and writers, validation and quarantine, dedup,
filters, export and the judge. Imports nothing from mining, training or pipelines."""

__version__ = "0.1.0"
