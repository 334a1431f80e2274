"""megavit checkpoints to and from other libraries' layouts: timm and Hugging Face
transformers.

`mapping.py` holds what a mapping hands the drivers; one module per target builds it
(`timm_vit.py`, `hf_vit.py`, `hf_clip.py`). `export_hf.py` and `import_hf.py` are the
drivers (`tools/export_hf.py`, `tools/import_hf.py`); `consolidate.py` streams serial
weights into one safetensors file (export, and `tools/checkpoint_convert.py
--to-safetensors`); `safetensors_files.py` reads a model directory's tensors.

Imports megavit's models, checkpointing, data, parallel and config; never training or
tasks (and checkpointing never imports this package).
"""
