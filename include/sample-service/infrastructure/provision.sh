#!/usr/bin/env bash
# Provision a sample-service host on an Amazon Linux (dnf/yum) or Debian/Ubuntu
# (apt) builder instance. Runs as root on cloud builder instances during the
# baking stage -- never on a developer machine or CI runner.
#
# Usage:  provision.sh [<artifact>]
#   without an artifact: prepare a base image (python 3.11+, the service user);
#     Deployline's baking stage runs it so.
#   <artifact>  sample-service-<version>.tar.gz as a local path, an
#               http(s):// URL or an s3:// URL (needs the aws CLI): also install
#               the service; Deployline's acceptance stage runs it so on the base
#               image to make the application image.
#               Defaults to $SAMPLE_SERVICE_ARTIFACT.
#
# Idempotent: re-running converges to the same state (packages present, user
# present, /opt/sample-service replaced atomically by the artifact's content,
# unit file rewritten only when it changes). The service is enabled; it is
# restarted if it was already running, and started when START_SERVICE=1.
#
# Runtime settings (e.g. SAMPLE_SERVICE_FAIL_HEALTH_AFTER for rollback demos)
# go in /etc/default/sample-service, which the unit reads if present.
set -euo pipefail
umask 022

readonly SERVICE=sample-service
readonly SERVICE_USER=sample
readonly INSTALL_DIR=/opt/sample-service
readonly UNIT_FILE=/etc/systemd/system/${SERVICE}.service
readonly LISTEN_HOST=0.0.0.0
readonly LISTEN_PORT=8080

log() { printf '[provision] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

ARTIFACT=${1:-${SAMPLE_SERVICE_ARTIFACT:-}}
[ "$(id -u)" -eq 0 ] || die "must run as root"

WORK=$(mktemp -d)
STAGE=""
cleanup() { rm -rf -- "$WORK" ${STAGE:+"$STAGE"}; }
trap cleanup EXIT

# ---------------------------------------------------------------- python 3.11+
find_python() {
    local candidate
    for candidate in python3.13 python3.12 python3.11 python3; do
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
    done
    return 1
}

install_packages() {
    if command -v dnf >/dev/null 2>&1; then
        # Amazon Linux 2023 ships python3 = 3.9; python3.11 is a separate package.
        dnf install -y python3.11 tar gzip || dnf install -y python3 tar gzip
    elif command -v yum >/dev/null 2>&1; then
        yum install -y python3.11 tar gzip || yum install -y python3 tar gzip
    elif command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -y
        apt-get install -y --no-install-recommends python3 tar gzip ca-certificates
        # older releases (e.g. Ubuntu 22.04) ship python3 < 3.11 but package python3.11
        find_python >/dev/null || apt-get install -y --no-install-recommends python3.11
    else
        die "no supported package manager (dnf, yum, apt-get) found"
    fi
}

if PYTHON_BIN=$(find_python); then
    log "using existing $PYTHON_BIN"
else
    log "installing python3"
    install_packages
    PYTHON_BIN=$(find_python) || die "python >= 3.11 is not available after installation"
fi
log "python: $PYTHON_BIN ($("$PYTHON_BIN" --version 2>&1))"

# ---------------------------------------------------------------- system user
NOLOGIN=$(command -v nologin || echo /bin/false)
if ! getent group "$SERVICE_USER" >/dev/null; then
    log "creating group $SERVICE_USER"
    groupadd --system "$SERVICE_USER"
fi
if ! getent passwd "$SERVICE_USER" >/dev/null; then
    log "creating system user $SERVICE_USER"
    useradd --system --gid "$SERVICE_USER" --home-dir "$INSTALL_DIR" --no-create-home \
        --shell "$NOLOGIN" --comment "sample-service" "$SERVICE_USER"
fi

if [ -z "$ARTIFACT" ]; then
    log "done: base image prepared (no artifact given, nothing installed)"
    exit 0
fi

# ---------------------------------------------------------------- artifact
TARBALL=$WORK/artifact.tar.gz
case "$ARTIFACT" in
    s3://*)
        command -v aws >/dev/null 2>&1 || die "aws CLI needed to fetch $ARTIFACT"
        aws s3 cp --only-show-errors "$ARTIFACT" "$TARBALL"
        ;;
    http://* | https://*)
        command -v curl >/dev/null 2>&1 || die "curl needed to fetch $ARTIFACT"
        curl --fail --silent --show-error --location --retry 3 -o "$TARBALL" "$ARTIFACT"
        ;;
    *)
        [ -f "$ARTIFACT" ] || die "artifact not found: $ARTIFACT"
        cp -- "$ARTIFACT" "$TARBALL"
        ;;
esac

# Unpack into a staging directory next to the target, check it, then swap it in.
mkdir -p -- "$(dirname "$INSTALL_DIR")"
STAGE=$(mktemp -d "${INSTALL_DIR}.new.XXXXXX")
tar -xzf "$TARBALL" -C "$STAGE" --no-same-owner
[ -f "$STAGE/run.sh" ] && [ -f "$STAGE/sample_service/__init__.py" ] ||
    die "$ARTIFACT does not look like a sample-service artifact"
chown -R root:root "$STAGE"
chmod -R u=rwX,go=rX "$STAGE"
chmod 0755 "$STAGE" "$STAGE/run.sh"
VERSION=$(cat "$STAGE/sample_service/VERSION" 2>/dev/null || echo unknown)

if [ -e "$INSTALL_DIR" ]; then
    OLD="${INSTALL_DIR}.old.$$"
    mv -- "$INSTALL_DIR" "$OLD"
    mv -- "$STAGE" "$INSTALL_DIR"
    rm -rf -- "$OLD"
else
    mv -- "$STAGE" "$INSTALL_DIR"
fi
log "installed sample-service $VERSION into $INSTALL_DIR"

# ---------------------------------------------------------------- systemd unit
cat >"$WORK/unit" <<EOF
# Managed by sample-service infrastructure/provision.sh -- local edits are overwritten.
[Unit]
Description=Deployline sample-service (demo HTTP service)
Wants=network-online.target
After=network-online.target

[Service]
Type=simple
User=$SERVICE_USER
Group=$SERVICE_USER
WorkingDirectory=$INSTALL_DIR
Environment=PYTHON=$PYTHON_BIN
Environment=PYTHONUNBUFFERED=1
EnvironmentFile=-/etc/default/$SERVICE
ExecStart=$INSTALL_DIR/run.sh --host $LISTEN_HOST --port $LISTEN_PORT
Restart=on-failure
RestartSec=2
TimeoutStopSec=10
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=yes

[Install]
WantedBy=multi-user.target
EOF

UNIT_CHANGED=0
if ! cmp -s "$WORK/unit" "$UNIT_FILE"; then
    install -m 0644 -o root -g root "$WORK/unit" "$UNIT_FILE"
    UNIT_CHANGED=1
    log "wrote $UNIT_FILE"
fi

if [ -d /run/systemd/system ]; then # systemd is PID 1 (not a chroot/container build)
    [ "$UNIT_CHANGED" -eq 0 ] || systemctl daemon-reload
    systemctl enable "$SERVICE.service"
    if systemctl is-active --quiet "$SERVICE.service"; then
        systemctl restart "$SERVICE.service"
        log "restarted $SERVICE"
    elif [ "${START_SERVICE:-0}" = 1 ]; then
        systemctl start "$SERVICE.service"
        log "started $SERVICE"
    fi
else
    systemctl enable "$SERVICE.service" # works offline: just creates the wants/ symlink
fi
log "done: $SERVICE enabled (http://$LISTEN_HOST:$LISTEN_PORT)"
