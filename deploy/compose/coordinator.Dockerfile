# The coordinator image for deploy/compose.yaml: the official Python image plus fedsync, built
# from this checkout (the build context is the repository root; what it sends is listed in
# coordinator.Dockerfile.dockerignore beside this file).
#
#   docker compose -f deploy/compose.yaml build coordinator
#
# FEDSYNC_EXTRAS picks the extras installed with it (default: coordinator).

# Stage 1: the checkout becomes one wheel, the same `pip wheel --no-deps -w dist .` a device uses.
FROM python:3.11-slim AS wheel
COPY . /src
RUN pip wheel --no-cache-dir --no-deps -w /dist /src

# Stage 2: install that wheel; the source tree stays behind in stage 1.
FROM python:3.11-slim
ARG FEDSYNC_EXTRAS="coordinator"
COPY --from=wheel /dist /tmp/dist
RUN pip install --no-cache-dir "$(echo /tmp/dist/fedsync-*.whl)[${FEDSYNC_EXTRAS}]" \
    && rm -rf /tmp/dist \
    && useradd --system --uid 10001 --home-dir /var/lib/fedsync --shell /usr/sbin/nologin fedsync \
    && install -d -o fedsync -g fedsync -m 0700 /var/lib/fedsync

USER fedsync
WORKDIR /var/lib/fedsync
ENTRYPOINT ["fedsync"]
CMD ["coordinator", "--help"]
