"""Data loaders: CounterFact (EasyEdit and ROME layouts), zsRE (MEND layout) and user JSONL/CSV
files -> ``EditRequest``s, plus the samples shipped in ``harness/data/samples``."""
from harness.data.common import DataError, LoadedData, Skipped
from harness.data.loading import KINDS, load_requests, sample_path

__all__ = ["DataError", "KINDS", "LoadedData", "Skipped", "load_requests", "sample_path"]
