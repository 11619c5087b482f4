"""ImageNet conversion: source images (class folders, flat val + label file, or the original
tars) to FFCV ``.beton`` files and DALI webdataset shards, in one decode pass per image.

Modules, one job each:
``sources``  enumerate the three input kinds into ordered (label, locator) items;
``labels``   read validation label files (Kaggle CSV, devkit ground truth + meta.mat);
``decode``   bytes -> RGB pixels the way the reference loader sees them, -> stored JPEG;
``dali_out`` webdataset shard + index writer; ``ffcv_out`` FFCV part store + ``.beton`` writer;
``state``    per-chunk completion records, settings fingerprint, atomic file helpers;
``manifest`` builds the ``manifest.json`` that readers and ``--verify`` trust;
``convert``  the resumable multi-process driver; ``verify`` re-reads outputs.

The format of what it writes (the manifest, the item list per split) is ``pipelines/dataroot.py``'s,
which the readers import too.
"""
TOOL_VERSION = "1.0.0"
