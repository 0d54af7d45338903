# The coordinator image for deploy/compose.yaml: the official Python image plus fedsync.
# FEDSYNC_PACKAGE may name a wheel or a version pin instead, e.g. "fedsync[coordinator]==0.1.0".
FROM python:3.11-slim

ARG FEDSYNC_PACKAGE="fedsync[coordinator]"
RUN pip install --no-cache-dir "${FEDSYNC_PACKAGE}" \
    && useradd --system --uid 10001 --home-dir /var/lib/fedsync --shell /usr/sbin/nologin fedsync \
    && install -d -o fedsync -g fedsync -m 0700 /var/lib/fedsync

USER fedsync
WORKDIR /var/lib/fedsync
ENTRYPOINT ["fedsync"]
CMD ["coordinator", "--help"]
