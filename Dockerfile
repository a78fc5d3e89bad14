# GPU CI benchmark for kpc: profile resnet50 on the GPU runtime, prune it to a latency budget,
# export it, and fail the job when the measured speedup is below the gate.
#
#   docker build -t kpc .
#   docker run --gpus all -v "$PWD/reports:/reports" kpc bench-ci
#
# NVIDIA's PyTorch container carries CUDA, cuDNN, PyTorch and TensorRT's Python bindings.
# This image has not been built on kpc's development machines (no Docker engine, no registry).
FROM nvcr.io/nvidia/pytorch:25.01-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    KPC_REPORTS=/reports

WORKDIR /opt/kpc
COPY pyproject.toml README.md ./
COPY kpc ./kpc
COPY exporters ./exporters
COPY benchmarks ./benchmarks
COPY profiles ./profiles

# The container's torch and TensorRT satisfy kpc's requirements and stay; Polygraphy drives TensorRT.
# onnxruntime-gpu must replace onnxruntime (they share one module, and the CPU wheel can hide the CUDA
# provider): remove both, then install the GPU wheel alone.
RUN pip install --no-cache-dir . polygraphy==0.53.6 \
    && pip uninstall -y onnxruntime onnxruntime-gpu \
    && pip install --no-cache-dir onnxruntime-gpu==1.31.1 \
    && useradd --create-home --uid 1000 kpc \
    && mkdir -p /reports \
    && chown kpc /reports

USER 1000
ENTRYPOINT ["bash", "/opt/kpc/benchmarks/ci_benchmark.sh"]
CMD ["bench-ci"]
