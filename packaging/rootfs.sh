# Sourced by scripts/package and scripts/package-test: cached Debian root filesystems.
# rootfs_tarball ARCH KIND prints the path of a tarball, made once and kept under
# $MGW_PKG_CACHE (outside the repository), so reruns skip debootstrap.
#   KIND=base   a clean Debian 12 minbase + python3: what a concentrator image has
#   KIND=build  base + python3-venv, python3-dev, gcc: where the package's venv is made
# Foreign architectures run under qemu-user-static through binfmt_misc (flag F, so the
# emulator needs no copy inside the chroot).
set -euo pipefail

SUITE=${MGW_SUITE:-bookworm}
MIRROR=${MGW_MIRROR:-http://deb.debian.org/debian}
CACHE=${MGW_PKG_CACHE:-/work/.cache/meter-gateway}
# what building the venv needs (libffi-dev: cffi, which has no armhf wheel)
BUILD_DEPS="python3-venv python3-dev gcc libc6-dev libffi-dev"

need_host_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v dpkg-deb >/dev/null || missing+=(dpkg)
    if [ "$(dpkg --print-architecture)" != amd64 ] || [ "${1:-}" = foreign ]; then
        [ -e /usr/bin/qemu-aarch64-static ] || missing+=(qemu-user-static)
        command -v update-binfmts >/dev/null || missing+=(binfmt-support)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "package: missing host tools: ${missing[*]} (apt-get install ${missing[*]})" >&2
        exit 2
    fi
    if [ "${1:-}" = foreign ]; then
        if [ ! -e /proc/sys/fs/binfmt_misc/status ]; then
            mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
        fi
        [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable >/dev/null
    fi
}

rootfs_tarball() {
    local arch=$1 kind=$2
    local tar="$CACHE/rootfs-$SUITE-$arch-$kind.tar"
    if [ -s "$tar" ]; then
        echo "$tar"
        return
    fi
    mkdir -p "$CACHE"
    local dir
    dir=$(mktemp -d "$CACHE/mk-$arch-$kind.XXXX")
    if [ "$kind" = base ]; then
        # minbase + python3: the interpreter the package's venv runs on
        debootstrap --arch="$arch" --variant=minbase --include=python3 \
            "$SUITE" "$dir" "$MIRROR" >"$dir.log" 2>&1 \
            || { echo "debootstrap $arch failed, see $dir.log" >&2; exit 1; }
    else
        tar -C "$dir" -xf "$(rootfs_tarball "$arch" base)"
        chroot_run "$dir" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq --no-install-recommends $BUILD_DEPS" \
            >"$dir.log" 2>&1 || { echo "build tools for $arch failed, see $dir.log" >&2; exit 1; }
    fi
    rm -rf "$dir/var/cache/apt/archives/"*.deb "$dir/var/lib/apt/lists/"*_Packages 2>/dev/null || true
    tar -C "$dir" -cf "$tar.tmp" .
    mv "$tar.tmp" "$tar"
    drop_root "$dir"
    rm -f "$dir.log"
    echo "$tar"
}

# chroot_run DIR CMD...: /proc, /dev (with /dev/pts, for the demo's pseudo-terminals) and
# resolv.conf for the time of the command; $CHROOT_WRAP goes before chroot
# ("unshare --net": no network at all)
chroot_run() {
    local dir=$1
    shift
    mkdir -p "$dir/proc" "$dir/dev"
    mount -t proc proc "$dir/proc"
    mount --rbind /dev "$dir/dev"
    mount --make-rslave "$dir/dev"
    cp -L /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
    local rc=0
    LC_ALL=C.UTF-8 ${CHROOT_WRAP:-} chroot "$dir" "$@" || rc=$?
    umount -R "$dir/dev"
    umount "$dir/proc"
    return $rc
}

# drop_root DIR: delete a throw-away root, never while anything is mounted in it
drop_root() {
    local dir=$1
    umount -R "$dir/dev" 2>/dev/null || true
    umount "$dir/proc" 2>/dev/null || true
    if grep -q " $dir/" /proc/mounts; then
        echo "still mounted under $dir: not deleting it" >&2
        return 1
    fi
    rm -rf "$dir"
}

# fresh_root ARCH KIND: a new throw-away directory holding that root filesystem
fresh_root() {
    local dir
    dir=$(mktemp -d "$CACHE/root-$1-$2.XXXX")
    tar -C "$dir" -xf "$(rootfs_tarball "$1" "$2")"
    chmod 0755 "$dir"           # mktemp's 0700 would lock every other user out of /
    echo "$dir"
}
