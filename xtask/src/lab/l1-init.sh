#!/bin/busybox sh
# /init of L1 (vmkit nested lab): load KVM and tun, then hand over to the
# agent, which runs the L2 VMMs and reports to L0 over this console.
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo "VMKIT-LAB-L1 init-reached uptime=$(cut -d' ' -f1 /proc/uptime)"
for m in @MODULES@; do
    insmod "/lab/modules/$m.ko" || echo "VMKIT-LAB-L1 insmod $m failed"
done
[ -c /dev/kvm ] || echo "VMKIT-LAB-L1 no /dev/kvm"
echo "VMKIT-LAB-L1 modules-loaded uptime=$(cut -d' ' -f1 /proc/uptime)"
/lab/agent lab-agent
echo "VMKIT-LAB-L1 agent-exit $?"
if grep -q 'vmkit.keep=1' /proc/cmdline; then
    echo "VMKIT-LAB-L1 keeping L1: a shell follows; leave with 'reboot -f'"
    setsid cttyhack sh
fi
reboot -f
