#!/bin/busybox sh
# /init of the L2 test guest (vmkit nested lab). One marker line per check:
# "VMKIT-CHECK <name> ok [detail]" or "VMKIT-CHECK <name> fail <reason>".
# The serial console carries them; the L1 agent collects and times them.
echo "VMKIT-CHECK init-reached"
export PATH=/bin
mount -t proc proc /proc
read -r up0 _ </proc/uptime
check() { echo "VMKIT-CHECK $*"; }
check serial ok

# vCPUs: as many processors online as the VMM was given (vmkit.cpus=N,
# added by the agent).
want=1
for w in $(cat /proc/cmdline); do
    case "$w" in vmkit.cpus=*) want=${w#vmkit.cpus=} ;; esac
done
got=$(grep -c '^processor' /proc/cpuinfo)
if [ "$got" = "$want" ]; then check cpus ok "n=$got"; else check cpus fail "want $want, /proc/cpuinfo lists $got"; fi
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
case " $(cat /proc/cmdline) " in
# Profiling: minivmm's boot-timer device (ignored elsewhere) reports how
# long the guest took from the VMM's point of view.
*" vmkit.dmesg "*) devmem 0xd1000000 8 123 || echo "VMKIT-LOG devmem failed" ;;
esac

for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "VMKIT-LOG insmod $m failed"
done

# Waits up to 5 s for a path to appear.
wait_for() {
    i=0
    while [ ! -e "$1" ] && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
    [ -e "$1" ]
}

# Block: read the host's pattern, write ours (the agent checks it later).
if wait_for /dev/vda; then
    got=$(dd if=/dev/vda bs=4096 count=@BLK_READ_BLOCKS@ 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" = "$(cat /etc/lab/blk-read.sha256)" ]; then
        check blk-read ok
    else
        check blk-read fail "sha256 $got"
    fi
    if dd if=/etc/lab/blk-write.bin of=/dev/vda bs=4096 seek=@BLK_WRITE_SEEK@ 2>/dev/null && sync; then
        check blk-write ok
    else
        check blk-write fail "dd or sync failed"
    fi
    # Sequential read throughput (the benchmark): O_DIRECT, so L2's page
    # cache (L2 has only 256 MiB) is not what is measured; timed by L2's
    # own clock (/proc/uptime, 10 ms ticks).
    read -r t0 _ </proc/uptime
    if dd if=/dev/vda of=/dev/null bs=1M count=@DD_MIB@ iflag=direct 2>/dev/null; then
        read -r t1 _ </proc/uptime
        check blk-dd ok "ms=$(awk "BEGIN { printf \"%d\", ($t1 - $t0) * 1000 }") mib=@DD_MIB@"
    else
        check blk-dd fail "dd iflag=direct of @DD_MIB@ MiB failed"
    fi
else
    check blk-read fail "no /dev/vda"
    check blk-write fail "no /dev/vda"
    check blk-dd fail "no /dev/vda"
fi

# Network: ping the L1 tap, then fetch the payload and check its digest.
if wait_for /sys/class/net/eth0; then
    ip link set lo up
    ip addr add @GUEST_IP@/24 dev eth0
    ip link set eth0 up
    if ping -c 1 -w 5 @HOST_IP@ >/dev/null 2>&1; then
        timeout 10 nc @HOST_IP@ @PAYLOAD_PORT@ </dev/null >/tmp/payload 2>/dev/null
        got=$(sha256sum /tmp/payload | cut -d' ' -f1)
        if [ "$got" = "$(cat /etc/lab/payload.sha256)" ]; then
            check net ok "bytes=$(wc -c </tmp/payload)"
        else
            check net fail "payload sha256 $got bytes=$(wc -c </tmp/payload)"
        fi
    else
        check net fail "no ping reply from @HOST_IP@"
    fi
else
    check net fail "no eth0"
fi

# Entropy: 64 KiB from the virtio rng.
i=0
while ! grep -q virtio /sys/class/misc/hw_random/rng_current 2>/dev/null && [ "$i" -lt 100 ]; do
    sleep 0.05; i=$((i + 1))
done
source=$(cat /sys/class/misc/hw_random/rng_current 2>/dev/null)
case "$source" in
virtio*)
    n=$(timeout 10 head -c @RNG_BYTES@ /dev/hwrng | wc -c)
    if [ "$n" -eq @RNG_BYTES@ ]; then check rng ok "source=$source"; else check rng fail "read $n bytes"; fi
    ;;
*) check rng fail "hwrng source is '$source'" ;;
esac

# virtio-console: a line to hvc0 must come back echoed by the agent.
if wait_for /dev/hvc0; then
    token="t$$-$(cut -c1-8 /proc/sys/kernel/random/uuid)"
    exec 3<>/dev/hvc0
    # Raw and without echo while fd 3 holds it open (settings made on a
    # closed tty do not stick).
    stty -F /dev/hvc0 raw -echo 2>/dev/null
    echo "VMKIT-PING $token" >&3
    reply=""
    read -t 10 reply <&3
    exec 3<&-
    if [ "$reply" = "VMKIT-PONG $token" ]; then check console ok; else check console fail "reply '$reply'"; fi
else
    check console fail "no /dev/hvc0"
fi

# Snapshot run (vmkit.snap=1, added by the agent): on "snapshot-ready" the
# agent snapshots the VMM and continues L2 in a new VMM process, which gets
# a line typed on this console. Echoing it shows the restored UART and its
# interrupt work; then the disk (O_DIRECT: the device, not the page cache)
# and the network must still answer.
case " $(cat /proc/cmdline) " in
*" @SNAPSHOT_CMDLINE@ "*)
    check snapshot-ready
    line=""
    read -t 30 -r line
    check restored-echo ok "$line"
    got=$(dd if=/dev/vda bs=4096 count=@BLK_READ_BLOCKS@ iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    if [ "$got" = "$(cat /etc/lab/blk-read.sha256)" ]; then
        check restored-blk ok
    else
        check restored-blk fail "sha256 $got"
    fi
    if ping -c 1 -w 5 @HOST_IP@ >/dev/null 2>&1; then
        check restored-net ok
    else
        check restored-net fail "no ping reply from @HOST_IP@"
    fi
    ;;
esac

# Profiling (vmkit.dmesg on the command line, see VMKIT_LAB_L2_APPEND):
# the kernel log with its own timestamps, left on the disk for the agent
# (the serial console would take minutes for it).
case " $(cat /proc/cmdline) " in
*" vmkit.dmesg "*)
    { echo "uptime at /init: $up0"; dmesg; } | head -c @DMESG_MAX@ >/tmp/dmesg
    dd if=/tmp/dmesg of=/dev/vda bs=4096 seek=@DMESG_SEEK@ conv=fsync 2>/dev/null
    ;;
esac

echo "VMKIT-CHECK done"
reboot -f
