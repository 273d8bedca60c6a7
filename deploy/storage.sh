#!/usr/bin/env bash
# Prepare quota-capable storage for an engine's data root, in a sparse loop file, so
# that a per-container `--storage-opt size=` works. Used by deploy/engines.sh for an
# engine it starts itself; root only. Prints the mount point on stdout.
#
#   deploy/storage.sh NAME    e.g. docker -> /var/lib/colima-e2b/storage/docker.{xfs,btrfs}
#                                            mounted at /var/lib/colima-e2b/docker
#
# Filesystem (COLIMA_E2B_STORAGE_FS=auto|xfs|btrfs, default auto):
#   xfs   mounted with prjquota, for the overlay drivers (overlay2 / overlay); the size
#         limits the writable layer. Needs a kernel with CONFIG_XFS_QUOTA.
#   btrfs with quotas, for the btrfs drivers. Simple quotas where the kernel has them
#         (6.7+): the size limits what the container writes, as on XFS. Else full
#         qgroups: the size limits the whole root filesystem (image included), and
#         removing containers is slow. The fallback when XFS has no quota support
#         (e.g. Firecracker kernels).
#   auto  an existing file is reused (xfs first), else xfs is tried, then btrfs.
# Idempotent: an existing file is never reformatted, an existing mount is kept.
# COLIMA_E2B_STORAGE_SIZE (default 32G) sizes a new file; it is sparse and costs host
# disk only as it fills, so keep sandbox quotas below the host's free space. The mount
# is not in /etc/fstab: engines.sh mounts it again after a reboot. To remove it: stop
# the engine, `umount /var/lib/colima-e2b/NAME`, delete the file.
set -euo pipefail

log() { printf '[storage] %s\n' "$*" >&2; }

btrfs_quota_mode() { # dir -> squota | qgroup | off (the kernel's word for it)
  local uuid; uuid=$(findmnt -n -o UUID --mountpoint "$1" 2>/dev/null)
  cat "/sys/fs/btrfs/$uuid/qgroups/mode" 2>/dev/null || echo off
}

# Quotas on a btrfs mount. Simple quotas (kernel 6.7+) where the kernel has them: they
# count what each subvolume writes, and dropping a container's snapshot costs next to
# nothing; full qgroups trace every shared extent of a dropped snapshot, which with a
# large image keeps a CPU busy for seconds per removed container. btrfs-progs 6.2 has no
# --simple, so the ioctl is made directly (BTRFS_IOC_QUOTA_CTL, ENABLE_SIMPLE_QUOTA).
btrfs_quota_on() { # dir
  case "$(btrfs_quota_mode "$1")" in
    squota) return 0 ;;
    qgroup) log "note: $1 has full btrfs qgroups (slow container removal); recreate its file for simple quotas"; return 0 ;;
  esac
  if python3 - "$1" <<'PY' 2>/dev/null
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.ioctl(fd, 0xC0109428, bytearray(struct.pack('QQ', 4, 0)))
PY
  then return 0; fi
  btrfs quota enable "$1"
}

name=${1:?usage: deploy/storage.sh NAME}
base=/var/lib/colima-e2b
dir=$base/$name
size=${COLIMA_E2B_STORAGE_SIZE:-32G}
want=${COLIMA_E2B_STORAGE_FS:-auto}

case "$want" in auto|xfs|btrfs) ;; *) log "COLIMA_E2B_STORAGE_FS must be auto, xfs or btrfs"; exit 2 ;; esac
if [ "$(id -u)" -ne 0 ]; then log "needs root"; exit 1; fi

if findmnt -n --mountpoint "$dir" >/dev/null 2>&1; then
  fstype=$(findmnt -n -o FSTYPE --mountpoint "$dir")
  opts=$(findmnt -n -o OPTIONS --mountpoint "$dir")
  if [ "$fstype" = xfs ] && [[ ,$opts, == *,prjquota,* || ,$opts, == *,pquota,* ]]; then
    log "$dir already mounted (xfs, project quotas)"
    echo "$dir"; exit 0
  fi
  if [ "$fstype" = btrfs ] && btrfs_quota_on "$dir"; then
    log "$dir already mounted (btrfs, $(btrfs_quota_mode "$dir"))"
    echo "$dir"; exit 0
  fi
  log "$dir is mounted but has no quota support ($fstype: $opts); not touching it"
  exit 1
fi

need() { # command package
  command -v "$1" >/dev/null 2>&1 && return 0
  if ! command -v apt-get >/dev/null 2>&1; then log "$2 is missing"; return 1; fi
  log "installing $2 with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "$2" >/dev/null
}

mount_xfs() { # file
  need mkfs.xfs xfsprogs || return 1
  log "mounting $1 at $dir (xfs, prjquota)"
  # discard punches freed blocks out of the loop file, so it shrinks back as it empties.
  local err
  if err=$(mount -t xfs -o loop,prjquota,discard "$1" "$dir" 2>&1); then return 0; fi
  log "mount failed: ${err%%$'\n'*}"
  dmesg 2>/dev/null | tail -n 5 | grep -i 'xfs.*quota' | sed 's/^/[storage] kernel: /' >&2 || true
  return 1
}

mount_btrfs() { # file
  need mkfs.btrfs btrfs-progs || return 1
  mount -t btrfs -o loop,discard=async "$1" "$dir" || return 1
  btrfs_quota_on "$dir" || { umount "$dir"; return 1; }
  log "mounted $1 at $dir (btrfs, $(btrfs_quota_mode "$dir"))"
}

try() { # fs: reuse or create $name.$fs and mount it
  local fs=$1 file=$base/storage/$name.$1 new=false
  if [ ! -e "$file" ]; then
    need "mkfs.$fs" "$([ "$fs" = xfs ] && echo xfsprogs || echo btrfs-progs)" || return 1
    log "creating $file (sparse, $size) formatted $fs"
    truncate -s "$size" "$file.partial"
    "mkfs.$fs" -q -L "ce2b-$name" "$file.partial" >/dev/null
    mv "$file.partial" "$file"
    new=true
  fi
  if "mount_$fs" "$file"; then return 0; fi
  if $new; then log "$fs with quotas does not work here; removing $file"; rm -f "$file"; fi
  return 1
}

mkdir -p "$base/storage" "$dir"
case "$want" in
  xfs|btrfs) try "$want" || exit 1 ;;
  auto)
    if [ -e "$base/storage/$name.xfs" ] && try xfs; then :
    elif [ -e "$base/storage/$name.btrfs" ] && try btrfs; then :
    elif try xfs; then :
    elif try btrfs; then :
    else exit 1
    fi ;;
esac
echo "$dir"
