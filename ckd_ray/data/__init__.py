"""Data: the bundled digits benchmark, LLaVA-1.5 readers (JSON + images, Parquet; local or s3://),
preprocessing into the student's model inputs, and the Ray Data pipeline that feeds Ray Train.

    kvqa.py            build the benchmark (`ckd-ray data build-kvqa`)
    knowledge_graph.py the number facts it retrieves
    processor.py       tokenizer + image processor + chat format (`Processor`)
    llava_json.py      streaming record scan of a JSON list / JSONL file
    llava_parquet.py   the Parquet layout, and the JSON -> Parquet writer
    sources.py         catalog, selection and mixing, read tasks, image folders and zips
    preprocess.py      records -> model-input columns (the column contract)
    rejects.py         the rejects file and the reject threshold
    pipeline.py        `build_student_dataset` (Ray Data) and `iter_plain_batches` (one process)
    config.py          `DataConfig`, `SourceConfig`
"""

from ckd_ray.data.config import DataConfig, SourceConfig
from ckd_ray.data.pipeline import PROGRESSIVE_CURRICULUM, StudentDataset, build_student_dataset, iter_plain_batches
from ckd_ray.data.processor import Processor
from ckd_ray.data.rejects import TooManyRejectsError

__all__ = [
    "DataConfig",
    "SourceConfig",
    "Processor",
    "StudentDataset",
    "build_student_dataset",
    "iter_plain_batches",
    "PROGRESSIVE_CURRICULUM",
    "TooManyRejectsError",
]
