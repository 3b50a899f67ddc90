#!/usr/bin/env bash
# The quickstart on the bundled easy-vqa example: bring the data in, check it, deduplicate it
# (and decontaminate the training split against the test split), look at it, export it.
# Every step writes a new dataset under runs/quickstart/ and is skipped when rerun unchanged.
set -euo pipefail
RUN=${RUN:-runs/quickstart}
EXEC=${EXEC:-ray}   # ray: each stage is a Ray Data job on a local Ray; local: in process
mkdir -p "$RUN"

assay ingest easy-vqa "$RUN/raw" --format example --rows-per-shard 10000 --executor "$EXEC"
assay validate "$RUN/raw/train" "$RUN/train-valid" --executor "$EXEC"
assay validate "$RUN/raw/test" "$RUN/test-valid" --executor "$EXEC"
# --images-only: the retrieval queries ("a blue circle") are shared by train and test by design
assay dedup "$RUN/train-valid" "$RUN/train-clean" --against "$RUN/test-valid" --images-only --executor "$EXEC"
assay dedup "$RUN/test-valid" "$RUN/test-clean" --executor "$EXEC"
assay stats "$RUN/train-clean"
assay export "$RUN/train-clean" "$RUN/export/train-vlm2vec.jsonl" --format jsonl --overwrite
assay export "$RUN/train-clean" "$RUN/export/train-flat.parquet" --format parquet --overwrite
echo
echo "quickstart done: clean datasets in $RUN/train-clean and $RUN/test-clean, exports in $RUN/export/"
