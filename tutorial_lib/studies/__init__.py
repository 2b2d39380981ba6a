"""The book's experiments. Nothing outside this package imports it.

* :mod:`tutorial_lib.studies.harness`: the cache entry every study is built into;
* :mod:`tutorial_lib.studies.baseline`: the small CPU baseline pre-trained by the book;
* :mod:`tutorial_lib.studies.finetune`: SST-2 fine-tuning and chapter 1's robustness study;
* :mod:`tutorial_lib.studies.position`: chapter 3's pre-training study of position schemes;
* :mod:`tutorial_lib.studies.length`: chapter 5's train-short / test-long study.

``python -m tutorial_lib.studies [NAME ...]`` builds (or finds) the named studies, all of
them without a name.
"""
