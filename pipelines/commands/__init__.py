"""One module per `assay` command; each defines `command` (a click.Command)."""
