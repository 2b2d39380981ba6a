"""Data: the book's data files, tokenizers and batching.

* :mod:`tutorial_lib.data.files`: the data sets the book reads (WikiText-2, SST-2,
  STS-B, Tiny Shakespeare), found locally first and verified by checksum, and the other
  STS tasks of chapter 7's lab (STS-12 to STS-16, SICK-R: MTEB's copies at pinned
  revisions, :func:`~tutorial_lib.data.files.load_sts`);
* :mod:`tutorial_lib.data.tokenization`: WordPiece, byte-level BPE and character
  tokenizers behind one interface;
* :mod:`tutorial_lib.data.batching`: masked-LM, classification and causal-LM batching.

The loaders are re-exported here, so ``from tutorial_lib import data`` then
``data.load_sst2("dev")`` reads a data set.
"""

from tutorial_lib.data.files import (REGISTRY, STS_TASKS, ChecksumError, DataFile,
                                     DataNotFoundError, STSTask, cache_dir, find_file,
                                     load_sst2, load_sts, load_stsb, load_tiny_shakespeare,
                                     load_wikitext2, search_locations, verify_file,
                                     wikitext2_pretraining_splits)

__all__ = ["REGISTRY", "STS_TASKS", "ChecksumError", "DataFile", "DataNotFoundError",
           "STSTask", "cache_dir", "find_file", "load_sst2", "load_sts", "load_stsb",
           "load_tiny_shakespeare", "load_wikitext2", "search_locations", "verify_file",
           "wikitext2_pretraining_splits"]
