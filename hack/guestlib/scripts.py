"""The guest's own scripts: /init (a busybox sh script) and the udhcpc hook for tofu.ip=dhcp."""

INIT = r"""#!/bin/sh
# PID 1 of the tofu-qemu tiny guest; the initramfs and rootfs.raw share it (docs/guest.md).
# PID 1 must never exit: the kernel panics when it does.
# Kernel command line knobs: tofu.name= tofu.ip= tofu.gw= tofu.shell= tofu.fetch= tofu.bigfile=
# tofu.lo_out=
# root= rootfstype=
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

[ -e /proc/self ] || mount -t proc proc /proc
grep -q '^sysfs /sys ' /proc/mounts || mount -t sysfs sysfs /sys
grep -q '^devtmpfs /dev ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
cmdline=$(cat /proc/cmdline)

param() {  # param KEY DEFAULT: the value of the last KEY= on the kernel command line
    value=$2
    set -f  # split the command line into words, but never glob them
    for word in $cmdline; do
        case $word in "$1="*) value=${word#*=} ;; esac
    done
    set +f
    printf '%s' "$value"
}
say() { echo "tofu-guest: $*"; }
shell_loop() { while :; do setsid cttyhack sh; sleep 1; done; }
fail() {
    echo "TOFU-GUEST-FAILED: $*"
    if [ "$(param tofu.shell 0)" = 1 ]; then shell_loop; fi
    sync; poweroff -f; sleep 10
}
wait_for() {  # wait_for TENTHS TEST...: poll a test for up to TENTHS tenths of a second
    tries=$1; shift
    while ! "$@"; do
        tries=$((tries - 1)); [ "$tries" -gt 0 ] || return 1
        usleep 100000
    done
}
iso_label() {  # iso_label DEV: the ISO 9660 volume id; busybox's findfs cannot read ISO labels
    [ "$(dd if="$1" bs=1 skip=32769 count=5 2>/dev/null)" = CD001 ] || return 1
    dd if="$1" bs=1 skip=32808 count=32 2>/dev/null | tr -d ' '
}
find_seed() {  # the device labelled cidata (cloud-init accepts CIDATA too), on any bus
    for block in /sys/class/block/*; do
        seed=/dev/${block##*/}
        [ -b "$seed" ] || continue
        case $(iso_label "$seed") in cidata | CIDATA) return 0 ;; esac
    done
    return 1
}
mount_seed() {  # the cloud-init NoCloud seed, when the VM has one: served as http://VM/cidata/
    # The modules are loaded: insmod virtio_scsi returned after its scan (scan=sync) and sr_mod
    # bound to the CD-ROM as it loaded, so the device is either there by now or absent: no wait.
    find_seed || return 0
    mkdir -p /run/cidata
    if mount -t iso9660 -o ro "$seed" /run/cidata; then
        ln -s /run/cidata /run/www/cidata  # busybox httpd follows symlinks
        say "cloud-init seed $seed on /run/cidata"
    else
        say "cannot mount the cloud-init seed $seed"
    fi
}
has_agent_port() {  # the virtio-serial port QEMU names org.qemu.guest_agent.0, as $agent_port
    for port in /sys/class/virtio-ports/*; do
        [ "$(cat "$port/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        agent_port=/dev/${port##*/}
        [ -c "$agent_port" ] && return 0
    done
    return 1
}
start_guest_agent() {  # qemu-ga, when the VM has the channel (docs/guest-agent.md)
    # virtio id 3 is the console/serial device; without one there is no port to wait for. The
    # port's name comes from QEMU a moment after virtio_console binds: wait up to 5 s for it.
    grep -qx 0x0003 /sys/bus/virtio/devices/*/device 2>/dev/null || return 0
    if ! wait_for 50 has_agent_port; then say "no guest agent port"; return 0; fi
    mkdir -p /run/qemu-ga
    qemu-ga -m virtio-serial -p "$agent_port" -t /run/qemu-ga -f /run/qemu-ga/qemu-ga.pid &
    say "guest agent on $agent_port"
}
fetch_loop() {  # tofu.fetch=HOST/PORT,...: GET / from each every 2 s, results in /fetch.txt
    # busybox nc, not wget: Debian's static busybox 1.35 wget segfaults. timeout: nc's -w does
    # not bound every connect, and one hung target must not stall the others.
    targets=$(param tofu.fetch "" | tr ',' ' ')
    [ -n "$targets" ] || return 0
    while :; do
        for target in $targets; do
            body=$(printf 'GET / HTTP/1.0\r\n\r\n' | timeout 5 nc -w 3 "${target%/*}" "${target##*/}" \
                2>/dev/null | tail -n 1)
            if [ -n "$body" ]; then echo "ok $target $body"; else echo "failed $target"; fi
        done >/run/www/fetch.tmp
        ip -o addr show dev eth0 | sed 's/^/addr /' >>/run/www/fetch.tmp
        mv /run/www/fetch.tmp /run/www/fetch.txt
        sleep 2
    done
}
loopback_out() {  # tofu.lo_out=1: the hostile root guest of docs/networking.md, which sends
    # 127.0.0.0/8 to its gateway. route_localnet on eth0: else the kernel refuses a loopback
    # destination there and drops replies from one. 127.0.0.1 off lo: that takes its local
    # routes with it, and a reply from an address of its own would be dropped as a martian.
    [ "$(param tofu.lo_out 0)" = 1 ] || return 0
    # shellcheck disable=SC2046 # the words of "default via GATEWAY dev eth0 ..."
    set -- $(ip -4 route show default)
    if [ "$1 $2" != "default via" ]; then say "tofu.lo_out: no default route"; return 0; fi
    echo 1 >/proc/sys/net/ipv4/conf/eth0/route_localnet
    ip -4 addr flush dev lo
    ip route add 127.0.0.0/8 via "$3" dev eth0 && say "127.0.0.0/8 routed via $3"
}
find_root() {
    case $1 in
        LABEL=* | UUID=*) root_dev=$(findfs "$1" 2>/dev/null) ;;
        *) root_dev=$1 ;;
    esac
    [ -b "$root_dev" ]
}

has_virtio_scsi() { grep -qx 0x0008 /sys/bus/virtio/devices/*/device 2>/dev/null; }  # virtio id 8
wants_module() {
    # The SCSI CD-ROM stack (for the cloud-init seed) costs 0.1-0.2 s of boot under TCG: load it
    # only when there is a virtio SCSI controller. virtio_pci/virtio_mmio come earlier in the
    # order, so the controller is on the virtio bus by the time the loop gets here. isofs (and
    # cdrom, which it needs) always load: a seed may also be a plain virtio disk.
    case $1 in
        scsi_common | scsi_mod | virtio_scsi | sr_mod) has_virtio_scsi ;;
        *) return 0 ;;
    esac
}
module_args() {
    # scan=sync: virtio_scsi's insmod returns only after its bus scan, so a CD-ROM is there by
    # the time sr_mod loads and mount_seed looks, with no polling (the default is async).
    case $1 in scsi_mod) echo scan=sync ;; esac
}
while read -r module; do  # in dependency order: busybox insmod does not resolve dependencies
    if [ -d "/sys/module/$module" ] || ! wants_module "$module"; then continue; fi
    # shellcheck disable=SC2046 # module_args gives zero or more words
    insmod "/lib/modules/tofu/$module.ko" $(module_args "$module") || say "insmod $module failed"
done </lib/modules/tofu/order

root=$(param root "")
if [ -e /etc/tofu-initramfs ] && [ -n "$root" ]; then
    wait_for 100 find_root "$root" || fail "root device $root did not appear"
    mkdir -p /newroot
    mount -t "$(param rootfstype ext4)" -o rw "$root_dev" /newroot || fail "cannot mount $root"
    for fs in /dev /proc /sys; do mount --move "$fs" "/newroot$fs"; done
    exec switch_root /newroot /init
fi
[ -e /etc/tofu-initramfs ] || mount -o remount,rw / 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp

name=$(param tofu.name tiny-guest | tr -c 'A-Za-z0-9._-' '_')
hostname "$name"
ip link set lo up
if wait_for 50 test -e /sys/class/net/eth0; then
    address=$(param tofu.ip 10.0.2.15/24)
    case $address in
        none) ;;
        dhcp) udhcpc -i eth0 -n -q -t 10 -T 1 -s /etc/udhcpc.script >/dev/null || say "dhcp failed" ;;
        *)
            ip link set eth0 up
            ip addr add "$address" dev eth0 || say "bad tofu.ip=$address"
            gateway=$(param tofu.gw 10.0.2.2)
            [ "$gateway" = none ] || ip route add default via "$gateway" || say "bad tofu.gw=$gateway"
            ;;
    esac
else
    say "no eth0 (no virtio-net device?)"
fi

loopback_out

# Power off on the ACPI power button, so QMP system_powerdown works. evdev reads need a
# whole struct input_event (24 bytes on x86_64): `head -c 1` would get EINVAL.
for event in /sys/class/input/event*; do
    [ "$(cat "$event/device/name" 2>/dev/null)" = "Power Button" ] || continue
    (
        dd if="/dev/input/${event##*/}" of=/dev/null bs=24 count=1 2>/dev/null || exit
        echo "TOFU-GUEST-POWEROFF name=$name"
        sync; poweroff -f
    ) &
done

boot_id=$(cat /proc/sys/kernel/random/boot_id)
mkdir -p /run/www
mount_seed
start_guest_agent
printf 'name=%s\nboot_id=%s\nkernel=%s\n' "$name" "$boot_id" "$(uname -r)" >/run/www/info.txt
printf '<!doctype html>\n<title>%s</title>\n<h1>%s</h1>\n<p>tofu-qemu tiny guest, boot %s</p>\n' \
    "$name" "$name" "$boot_id" >/run/www/index.html
bigfile=$(param tofu.bigfile 0)
[ "$bigfile" = 0 ] || dd if=/dev/zero of=/run/www/big.bin bs=1M count="$bigfile" 2>/dev/null
ln -s /usr/lib/tofu/cgi-bin /run/www/cgi-bin  # the test marker (MARKER_CGI)
httpd -p 80 -h /run/www || fail "httpd did not start"
fetch_loop &

echo "TOFU-GUEST-READY name=$name uptime=$(cut -d' ' -f1 /proc/uptime)"
if [ "$(param tofu.shell 0)" = 1 ]; then shell_loop & fi
while :; do sleep 3600; done  # waiting in the foreground also reaps orphans adopted by PID 1
"""

UDHCPC_SCRIPT = r"""#!/bin/sh
# udhcpc event hook for tofu.ip=dhcp: apply the lease to $interface.
# shellcheck disable=SC2154 # udhcpc sets interface, ip, mask and router in the environment
# IPv4 only: flushing every address would drop the IPv6 link-local one, and with it SLAAC.
case $1 in
    deconfig) ip -4 addr flush dev "$interface"; ip link set "$interface" up ;;
    bound | renew)
        ip -4 addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        [ -z "$router" ] || ip route replace default via "${router%% *}" dev "$interface"
        ;;
esac
"""

MARKER_CGI = r"""#!/bin/sh
# GET /cgi-bin/marker: the marker file on the root disk; /cgi-bin/marker?VALUE writes VALUE first
# (letters, digits, '-' and '_') and syncs it to the disk. For the snapshot tests: their only way
# into the guest's disk.
marker=/root/marker
printf 'Content-Type: text/plain\r\n\r\n'
case $QUERY_STRING in
    "") ;;
    *[!A-Za-z0-9_-]*) echo "bad marker"; exit 0 ;;
    *) printf '%s\n' "$QUERY_STRING" >"$marker.new" && sync && mv "$marker.new" "$marker" && sync ;;
esac
cat "$marker" 2>/dev/null
"""
