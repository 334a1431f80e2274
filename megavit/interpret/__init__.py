"""Looking inside a ViT: attention probabilities recorded from any attention type and
layout (`recording.py`), turned into maps by the usual methods (`methods.py`: per-head and
head-fused maps, rollout, the MAP probe's attention, gradient-weighted relevancy) and drawn
over the image (`render.py`, matplotlib). `tools/attention_maps.py` is the command line."""
