"""assay.pipelines: executors (Ray), the `assay` command line, the mine-train loop and the report."""
