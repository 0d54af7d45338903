#!/usr/bin/env bash
# Install a fedsync device agent on a Raspberry Pi (or any systemd Linux) as a service.
#
#   sudo deploy/raspberry-pi/install.sh --broker mqtts://broker.lan:8883 --device-id pi-kitchen \
#       --password-file ./pi-kitchen.pw --ca-file ./ca.pem --federation farm
#
# Run it from a fedsync checkout on the Pi (git clone, or the repository copied over): it
# installs that checkout. --package installs a wheel instead (built on any machine with
# `pip wheel --no-deps -w dist .` and copied here), another source directory, or a git URL.
#
# What it does, each step skipped when already done (running it twice changes nothing;
# running it with new arguments updates the config and restarts the agent):
#   1. the 'fedsync' system account (deploy/systemd/fedsync.sysusers.conf);
#   2. a virtualenv in /opt/fedsync/venv with fedsync installed into it (device dependencies
#      only: paho-mqtt, numpy, zstandard, cbor2); a rerun with a new wheel or a changed
#      checkout reinstalls fedsync and restarts the agent;
#   3. /etc/fedsync/agent.toml written from the arguments, /etc/fedsync/DEVICE.pw and
#      ca.pem copied in (0640 root:fedsync);
#   4. deploy/systemd/fedsync-agent@.service installed and fedsync-agent@DEVICE enabled
#      and started.
#
# --root DIR installs the files under DIR instead of / and skips the account, pip and
# systemctl: for packaging, and for the test that checks what this script writes.
set -euo pipefail

usage() {
    cat <<'USAGE'
usage: install.sh --broker URL --device-id ID --password-file FILE [options]

required:
  --broker URL           mqtt://HOST:PORT or mqtts://HOST:PORT (TLS)
  --device-id ID         this device's id = MQTT client id and user ([A-Za-z0-9_.-]{1,64})
  --password-file FILE   file whose first line is this device's broker password

options:
  --ca-file FILE         CA certificate that signed the broker's certificate (for mqtts://)
  --federation NAME      federation name (default: demo)
  --data-index N         built-in synthetic data: which device's slice (default: the
                         trailing digits of the device id)
  --keepalive SECONDS    MQTT keepalive (default 15; 30 on metered cellular links)
  --package SPEC         what to pip install (default: the checkout this script is in):
                           a wheel     ./fedsync-0.1.0-py3-none-any.whl
                           a source directory   /home/pi/fedsync
                           a git URL   "fedsync @ git+https://<your-git-host>/fedsync.git"
                         extras go in brackets: "./fedsync-0.1.0-py3-none-any.whl[signing]";
                         a bare name ("fedsync==0.1.0") works only once published on PyPI
  --venv DIR             virtualenv location (default: /opt/fedsync/venv)
  --no-start             install and enable, but do not start now
  --root DIR             install under DIR; skip account, pip and systemctl
  -h, --help             this help
USAGE
}

die() { echo "install.sh: $*" >&2; exit 2; }

BROKER="" DEVICE="" PASSWORD_FILE="" CA_FILE="" FEDERATION="demo" DATA_INDEX="" KEEPALIVE="15"
PACKAGE="" VENV="/opt/fedsync/venv" ROOT="" START=1
while [ $# -gt 0 ]; do
    case "$1" in
        --broker) BROKER="${2:?--broker needs a value}"; shift 2 ;;
        --device-id) DEVICE="${2:?--device-id needs a value}"; shift 2 ;;
        --password-file) PASSWORD_FILE="${2:?--password-file needs a value}"; shift 2 ;;
        --ca-file) CA_FILE="${2:?--ca-file needs a value}"; shift 2 ;;
        --federation) FEDERATION="${2:?--federation needs a value}"; shift 2 ;;
        --data-index) DATA_INDEX="${2:?--data-index needs a value}"; shift 2 ;;
        --keepalive) KEEPALIVE="${2:?--keepalive needs a value}"; shift 2 ;;
        --package) PACKAGE="${2:?--package needs a value}"; shift 2 ;;
        --venv) VENV="${2:?--venv needs a value}"; shift 2 ;;
        --root) ROOT="${2:?--root needs a value}"; shift 2 ;;
        --no-start) START=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done

# -- validate everything before touching the system ---------------------------------------------
[ -n "$BROKER" ] || die "--broker is required"
[ -n "$DEVICE" ] || die "--device-id is required"
[ -n "$PASSWORD_FILE" ] || die "--password-file is required"
NAME_RE='^[A-Za-z0-9_.-]{1,64}$'
[[ "$DEVICE" =~ $NAME_RE ]] || die "--device-id '$DEVICE' must match [A-Za-z0-9_.-]{1,64}"
[[ "$FEDERATION" =~ $NAME_RE ]] || die "--federation '$FEDERATION' must match [A-Za-z0-9_.-]{1,64}"
case "$DEVICE" in coordinator|monitor) die "--device-id '$DEVICE' is a reserved account name" ;; esac
[[ "$BROKER" =~ ^mqtts?://[A-Za-z0-9._:-]+(:[0-9]+)?$ ]] || die "--broker '$BROKER' must look like mqtt(s)://HOST:PORT"
[[ "$KEEPALIVE" =~ ^[0-9]+$ ]] || die "--keepalive must be a whole number of seconds"
if [ -z "$DATA_INDEX" ] && ! [[ "$DEVICE" =~ [0-9]+$ ]]; then
    die "--data-index is required: device id '$DEVICE' has no trailing number to take it from"
fi
[ -z "$DATA_INDEX" ] || [[ "$DATA_INDEX" =~ ^[0-9]+$ ]] || die "--data-index must be a whole number"
[ -r "$PASSWORD_FILE" ] || die "cannot read --password-file $PASSWORD_FILE"
[ -s "$PASSWORD_FILE" ] || die "--password-file $PASSWORD_FILE is empty"
[ -z "$CA_FILE" ] || [ -r "$CA_FILE" ] || die "cannot read --ca-file $CA_FILE"
if [[ "$BROKER" == mqtts://* ]] && [ -z "$CA_FILE" ]; then
    echo "install.sh: note: mqtts:// without --ca-file trusts the system CA store" >&2
fi

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
UNIT_SRC="$HERE/../systemd/fedsync-agent@.service"
SYSUSERS_SRC="$HERE/../systemd/fedsync.sysusers.conf"
[ -r "$UNIT_SRC" ] || die "missing $UNIT_SRC: run this script from a fedsync checkout (it installs deploy/systemd/)"

# What to install. A wheel or a source directory (anything with a '/' or ending in .whl) must
# exist now; a source directory is built into a wheel first (pip install of a wheel is the one
# path below). Anything else is a pip requirement: a git URL, or a name once published.
if [ -z "$PACKAGE" ]; then
    PACKAGE="$(cd "$HERE/../.." && pwd)"
    [ -f "$PACKAGE/pyproject.toml" ] || die "no fedsync source at $PACKAGE: pass --package WHEEL|DIR|URL"
fi
EXTRAS=""
PACKAGE_PATH="$PACKAGE"
EXTRAS_RE='^\[[A-Za-z0-9_,-]+\]$'
if [[ "$PACKAGE" == *"]" && "[${PACKAGE##*[}" =~ $EXTRAS_RE ]]; then
    PACKAGE_PATH="${PACKAGE%[*}" EXTRAS="[${PACKAGE##*[}"
fi
LOCAL=""
if [[ "$PACKAGE_PATH" == */* || "$PACKAGE_PATH" == *.whl ]] && [[ "$PACKAGE_PATH" != *://* ]]; then
    if [[ "$PACKAGE_PATH" == *.whl ]]; then
        if [ ! -f "$PACKAGE_PATH" ] || [ ! -r "$PACKAGE_PATH" ]; then die "cannot read wheel --package $PACKAGE_PATH"; fi
        LOCAL="wheel"
    else
        [ -d "$PACKAGE_PATH" ] || die "--package $PACKAGE_PATH: no such wheel or directory"
        [ -f "$PACKAGE_PATH/pyproject.toml" ] || die "--package $PACKAGE_PATH: no pyproject.toml in it"
        LOCAL="dir"
    fi
    PACKAGE_PATH="$(cd "$(dirname "$PACKAGE_PATH")" && pwd)/$(basename "$PACKAGE_PATH")"
fi

if [ -z "$ROOT" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root (sudo), or use --root DIR"
fi
ETC="$ROOT/etc/fedsync"
UNIT_DIR="$ROOT/etc/systemd/system"
UNIT="fedsync-agent@${DEVICE}.service"
CHANGED=0

# install_file SRC DEST MODE: copy only when the content differs (keeps reruns quiet and idempotent).
install_file() {
    local src="$1" dest="$2" mode="$3"
    if [ -f "$dest" ] && cmp -s "$src" "$dest"; then
        return 0
    fi
    install -m "$mode" "$src" "$dest.tmp.$$"
    mv -f "$dest.tmp.$$" "$dest"
    CHANGED=1
    echo "  wrote $dest"
}

# -- 1. account ------------------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    if ! id fedsync >/dev/null 2>&1; then
        if command -v systemd-sysusers >/dev/null 2>&1; then
            systemd-sysusers "$SYSUSERS_SRC"
        else
            useradd --system --home-dir /var/lib/fedsync --no-create-home --shell /usr/sbin/nologin fedsync
        fi
        echo "  created account fedsync"
    fi
fi

STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT

# The installed fedsync's files and their hashes (its RECORD without the .dist-info entries,
# which name the path it came from): a change means new code, so the agent is restarted.
installed_code() {
    cat "$VENV"/lib/python3*/site-packages/fedsync-*.dist-info/RECORD 2>/dev/null | grep -v '\.dist-info/' || true
}

# -- 2. virtualenv and package ------------------------------------------------------------------------
if [ -z "$ROOT" ]; then
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
        || die "fedsync needs Python >= 3.11 (Raspberry Pi OS bookworm or newer); found $(python3 -V 2>&1)"
    if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
        command -v apt-get >/dev/null 2>&1 || die "python3 venv/ensurepip missing and no apt-get to install them"
        apt-get install -y python3-venv
    fi
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
        echo "  created $VENV"
    fi
    # Raspberry Pi OS points pip at piwheels (prebuilt numpy/zstandard for armv7/aarch64) in
    # /etc/pip.conf; pip in a venv reads it too. --upgrade-strategy only-if-needed leaves
    # already-satisfied dependencies alone, so a rerun downloads nothing.
    PIP=("$VENV/bin/pip" --quiet --disable-pip-version-check)
    SPEC="$PACKAGE"
    if [ "$LOCAL" = "dir" ]; then
        # Not an editable install: the unit runs with ProtectHome=yes and could not see a
        # checkout under /home; the venv gets its own copy of the code.
        "${PIP[@]}" wheel --no-deps -w "$STAGE/wheel" "$PACKAGE_PATH"
        PACKAGE_PATH="$(echo "$STAGE"/wheel/fedsync-*.whl)"
        LOCAL="wheel"
    fi
    [ "$LOCAL" != "wheel" ] || SPEC="$PACKAGE_PATH$EXTRAS"
    before="$(installed_code)"
    "${PIP[@]}" install --upgrade-strategy only-if-needed "$SPEC"
    if [ "$LOCAL" = "wheel" ] && [ -n "$before" ]; then
        # pip skips a wheel whose version is already installed ("same version as the provided
        # wheel"), which would keep the old code after a rebuild: reinstall fedsync itself
        # (not its dependencies).
        "${PIP[@]}" install --no-deps --force-reinstall "$PACKAGE_PATH"
    fi
    if [ "$(installed_code)" != "$before" ]; then
        CHANGED=1
        echo "  installed fedsync from $PACKAGE into $VENV"
    fi
    "$VENV/bin/fedsync" --help >/dev/null
fi

# -- 3. configuration ---------------------------------------------------------------------------------
install -d -m 0750 "$ETC"
[ -n "$ROOT" ] || chgrp fedsync "$ETC"
{
    echo "# /etc/fedsync/agent.toml: written by deploy/raspberry-pi/install.sh; rerun it to change."
    echo "# Every key and its default: device_agent/config.py. The device id, its password file and"
    echo "# the state directory come from the unit (fedsync-agent@DEVICE.service), one per device."
    echo ""
    echo "[broker]"
    echo "url = \"$BROKER\""
    if [ -n "$CA_FILE" ]; then echo "ca_file = \"/etc/fedsync/ca.pem\""; fi
    echo "keepalive = $KEEPALIVE"
    echo ""
    echo "[federation]"
    echo "name = \"$FEDERATION\""
    echo ""
    echo "[agent]"
    echo "log_level = \"info\""
    if [ -n "$DATA_INDEX" ]; then
        echo ""
        echo "[data]"
        echo "index = $DATA_INDEX"
    fi
} > "$STAGE/agent.toml"
install_file "$STAGE/agent.toml" "$ETC/agent.toml" 0640
head -n 1 "$PASSWORD_FILE" > "$STAGE/device.pw"
install_file "$STAGE/device.pw" "$ETC/$DEVICE.pw" 0640
if [ -n "$CA_FILE" ]; then
    install_file "$CA_FILE" "$ETC/ca.pem" 0644
fi
if [ -z "$ROOT" ]; then
    chgrp fedsync "$ETC/agent.toml" "$ETC/$DEVICE.pw"
fi

# -- 4. the unit ----------------------------------------------------------------------------------------
install -d -m 0755 "$UNIT_DIR"
sed "s#/opt/fedsync/venv#$VENV#g" "$UNIT_SRC" > "$STAGE/unit"
install_file "$STAGE/unit" "$UNIT_DIR/fedsync-agent@.service" 0644

if [ -n "$ROOT" ]; then
    echo "installed under $ROOT (no account, pip or systemctl with --root; the package would be $PACKAGE)"
    exit 0
fi
systemctl daemon-reload
systemctl enable --quiet "$UNIT"
if [ "$START" -eq 1 ]; then
    if [ "$CHANGED" -eq 1 ] && systemctl is-active --quiet "$UNIT"; then
        systemctl restart "$UNIT"
        echo "  restarted $UNIT (configuration changed)"
    else
        systemctl start "$UNIT"
    fi
fi
echo "fedsync agent $DEVICE installed. Status: systemctl status $UNIT; logs: journalctl -u $UNIT -f"
