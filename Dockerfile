# megavit inside the NGC PyTorch container (documented, not built in CI).
#
#   docker build -t megavit .
#   docker run --gpus all --ipc=host --ulimit memlock=-1 --ulimit stack=67108864 \
#       -it megavit bash examples/pretrain_vit22b.sh
#
# The container's own torch (and apex, NCCL, cuDNN) stay as they are: megavit's metadata
# does not pin torch, so `pip install -e .` never replaces it.
ARG NGC_TAG=25.10-py3
FROM nvcr.io/nvidia/pytorch:${NGC_TAG}

WORKDIR /workspace/megavit
COPY . .
RUN python -c "import torch; print('container torch', torch.__version__)" > /tmp/torch-before \
 && pip install --no-cache-dir -e ".[data]" \
 && python -c "import torch; print('container torch', torch.__version__)" > /tmp/torch-after \
 && diff /tmp/torch-before /tmp/torch-after
