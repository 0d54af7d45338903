#!/data/data/com.termux/files/usr/bin/bash
# Termux:Boot script: start the fedsync agent when the phone boots, and keep it running.
# Install: copy to ~/.termux/boot/fedsync-agent and chmod +x it (deploy/termux/README.md).
#
# Android has no systemd, so this loop does what fedsync-agent@.service does on a Pi:
# restart after a failure with exponential backoff (5 s doubling to 10 min), stop when the
# agent exits 0 (the federation is finished). Configuration: ~/.config/fedsync/agent.toml,
# which names the device id and its password file; the outbox lives in ~/.local/state/fedsync.
set -uo pipefail

CONFIG="$HOME/.config/fedsync/agent.toml"
STATE="$HOME/.local/state/fedsync"
LOG="$STATE/agent.log"
FEDSYNC="$PREFIX/bin/fedsync"
mkdir -p "$STATE"

# Keep the CPU awake while the agent runs (Android otherwise suspends Termux with the screen
# off); released by termux-wake-unlock or when Termux exits.
termux-wake-lock

delay=5
while true; do
    started=$(date +%s)
    # Keep the log bounded on a phone: one rotation at 10 MB.
    if [ -f "$LOG" ] && [ "$(wc -c < "$LOG")" -gt 10485760 ]; then
        mv -f "$LOG" "$LOG.1"
    fi
    echo "$(date -Is) boot-fedsync-agent: starting" >> "$LOG"
    "$FEDSYNC" agent --config "$CONFIG" --state-dir "$STATE/outbox" >> "$LOG" 2>&1
    rc=$?
    echo "$(date -Is) boot-fedsync-agent: agent exited with status $rc" >> "$LOG"
    if [ "$rc" -eq 0 ]; then
        break  # federation finished
    fi
    # A run that lasted a while was healthy: start the backoff over.
    if [ $(( $(date +%s) - started )) -gt 600 ]; then
        delay=5
    fi
    sleep "$delay"
    delay=$(( delay * 2 > 600 ? 600 : delay * 2 ))
done
termux-wake-unlock
