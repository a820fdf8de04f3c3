#!/bin/sh
# Drop-in for the Zephyr sample's write_shared_memory.sh: same flags and defaults, but the message goes
# through `shmguard write` (bounded, audited, never truncating the region) instead of dd.
# Usage: write_shared_memory.sh [-s size in bytes] [-l location] [-m message] [-v]
# The supervisor is found by its policy: $SHMGUARD_POLICY (default: standard, the seed's layout). shmguard
# talks only to a control socket served by root or the policy's owner: a local user who binds the path in /tmp
# while no supervisor holds it is refused in one line naming its uid, and receives nothing.
set -eu
export LC_ALL=C  # sizes are in bytes, as dd counted them

SHM_SIZE=4194304
SHM_LOC="/dev/shm/ivshmem"
SHM_MSG="This is a message test for ivshmem shared memory"
VERBOSE=0
POLICY="${SHMGUARD_POLICY:-standard}"
SHMGUARD="${SHMGUARD:-shmguard}"

usage() {
	echo "Usage: $0 [-s size in bytes] [-l location] [-m message] [-v]" >&2
	exit 1
}

while [ $# -gt 0 ]; do
	case "$1" in
	-s) [ $# -ge 2 ] || usage; SHM_SIZE="$2"; shift ;;
	-l) [ $# -ge 2 ] || usage; SHM_LOC="$2"; shift ;;
	-m) [ $# -ge 2 ] || usage; SHM_MSG="$2"; shift ;;
	-v) VERBOSE=1 ;;
	*) usage ;;
	esac
	shift
done

case "$SHM_SIZE" in
'' | *[!0-9]*) echo "$0: -s $SHM_SIZE: the size must be a number of bytes" >&2; exit 1 ;;
esac

# The seed's first rule: the size must be the region's. Ask the supervisor instead of trusting -s.
status=$("$SHMGUARD" status --json --policy "$POLICY") || exit 1
region_size=$(printf '%s' "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["region"]["size"])')
region_path=$(printf '%s' "$status" | python3 -c 'import json,sys; print(json.load(sys.stdin)["region"]["path"] or "")')
if [ "$SHM_SIZE" != "$region_size" ]; then
	echo "$0: -s $SHM_SIZE does not match the region's $region_size bytes; nothing written" >&2
	exit 1
fi
if [ -n "$region_path" ] && [ "$SHM_LOC" != "$region_path" ]; then
	echo "$0: -l $SHM_LOC is not the supervised region ($region_path); nothing written" >&2
	exit 1
fi

# Like the seed: a message longer than the region is cut to its size (and has no NUL), else NUL-padded.
if [ "${#SHM_MSG}" -ge "$SHM_SIZE" ]; then
	set -- --stdin
	message_source() { printf %s "$SHM_MSG" | head -c "$SHM_SIZE"; }
else
	set -- -m "$SHM_MSG"
	message_source() { :; }
fi
if [ "$VERBOSE" = 1 ]; then
	message_source | "$SHMGUARD" write --policy "$POLICY" "$@"
else
	message_source | "$SHMGUARD" write --policy "$POLICY" "$@" >/dev/null
fi
