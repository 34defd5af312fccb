# syntax=docker/dockerfile:1
# retinagrade serving image: ONNX Runtime + FastAPI, the shipped model inside (package data), no PyTorch,
# no compilers.
#
#   podman build --format docker --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt -t retinagrade .
#   (docker build works the same; --format docker keeps the HEALTHCHECK, which the OCI format drops)
#
# BASE_IMAGE must provide python3.11 with venv at /usr/bin or /usr/local/bin (python:3.11-slim-bookworm, or
# the Debian-built local base from deploy/container/build-base.sh where no registry can be reached).
# Both stages use the same base: the venv's interpreter is a link into the base image.
ARG BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY src/ src/
COPY models/ models/
# The optional secret "ca_bundle" is a CA bundle for pip (a TLS-inspecting proxy); nothing of it stays in
# the image. The serving dependencies only (no extra: no PyTorch, no scikit-learn), at the exact versions of
# constraints.txt, then the package itself, whose wheel carries the shipped model as package data. The
# venv's own pip and setuptools go at the end: the runtime never installs anything. Also left out, for size
# (the image budget is 500 MB, deploy/container/container-test.sh): test suites, OpenCV's Haar cascades, ONNX
# Runtime's model-optimisation tooling, which inference never imports, and its C/C++ API library
# (libonnxruntime.so, 35 MB), which the Python binding does not link (it carries the runtime itself;
# tests/deploy/test_container.py checks that it serves the model without that library).
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
       > requirements.txt \
    && /opt/venv/bin/pip install --no-warn-script-location -r requirements.txt -c constraints.txt \
    && /opt/venv/bin/pip install --no-warn-script-location --no-deps . \
    && /opt/venv/bin/python -c "import retinagrade.api.app, retinagrade.pipeline, retinagrade.cli" \
    && /opt/venv/bin/python -c "from retinagrade.pipeline import DEFAULT_MODEL; assert DEFAULT_MODEL.is_file()" \
    && /opt/venv/bin/pip uninstall --yes pip setuptools \
    && find /opt/venv -depth -type d -name tests -path '*/site-packages/*/tests' -exec rm -rf {} + \
    && site=/opt/venv/lib/python3.11/site-packages \
    && rm -rf "$site/cv2/data" "$site/onnxruntime/transformers" "$site/onnxruntime/quantization" \
              "$site/onnxruntime/tools" "$site"/onnxruntime/capi/libonnxruntime.so* \
    && /opt/venv/bin/python -c "from retinagrade.pipeline import GradingPipeline; GradingPipeline.load(threads=1)" \
    && /opt/venv/bin/python -m compileall -q -j 0 /opt/venv/lib > /dev/null

FROM ${BASE_IMAGE} AS runtime
ARG MODEL_VERSION=unknown
ARG VCS_REF=unknown
LABEL org.opencontainers.image.title="retinagrade" \
      org.opencontainers.image.description="Diabetic retinopathy grading REST service (ONNX Runtime)" \
      org.opencontainers.image.licenses="Apache-2.0 (code); model weights: see models/README.md" \
      org.opencontainers.image.revision="${VCS_REF}" \
      io.retinagrade.model.version="${MODEL_VERSION}"

RUN groupadd --system --gid 10001 retinagrade \
    && useradd --system --uid 10001 --gid retinagrade --no-create-home --home-dir /var/lib/retinagrade \
       --shell /usr/sbin/nologin retinagrade \
    && mkdir -p /var/lib/retinagrade \
    && chown retinagrade:retinagrade /var/lib/retinagrade

# The shipped model is inside the venv (the package's data); RETINAGRADE_MODEL=... serves another one.
COPY --from=build /opt/venv /opt/venv
COPY deploy/container/healthcheck.py /opt/retinagrade/healthcheck.py

# Threads: one uvicorn worker per container (scale with replicas, not processes: each worker would load its
# own model); ONNX Runtime's intra-op threads and the preprocessing pool sized to a 2-vCPU task. OMP and
# OpenBLAS pools are pinned to 1 so nothing oversubscribes the CPUs behind ONNX Runtime's back.
# Override any of them at run time (docker run -e / the ECS task definition).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    RETINAGRADE_HOST=0.0.0.0 \
    RETINAGRADE_PORT=8000 \
    RETINAGRADE_WORKERS=1 \
    RETINAGRADE_THREADS=2 \
    RETINAGRADE_PREPARE_WORKERS=2 \
    RETINAGRADE_AUDIT_PATH=/var/lib/retinagrade/audit.sqlite3 \
    OMP_NUM_THREADS=1 \
    OPENBLAS_NUM_THREADS=1

WORKDIR /var/lib/retinagrade
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/retinagrade/healthcheck.py"]
# Shell form only to expand RETINAGRADE_WORKERS; exec hands PID 1 to uvicorn so SIGTERM drains requests.
CMD ["/bin/sh", "-c", "exec retinagrade serve --workers \"${RETINAGRADE_WORKERS}\""]
