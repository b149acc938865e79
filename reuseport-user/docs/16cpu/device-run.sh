#!/usr/bin/env bash
# The second 16-CPU device session (the b-* files here), as it ran: from the project root, after
# `cargo build --release && bash ../shared/scale/prepare.sh` and `cp` of this file into .scale/,
# `run` with carry [".scale"] and command `OUT=$OUT BUDGET=400 bash .scale/device-run.sh`.
# Results: $OUT/log.txt and $OUT/scale.tgz (every experiment's directory); each NAME's
# results.json is stored here as b-NAME.json.gz. The first session (a-*) ran the same script with
# the list in README.md, `R=5` and a timeout of 150 s for its first line. `LIST=next` runs the
# next experiments instead (the project README's "Next on 16 CPUs": veth-rss with all CPUs
# shared, softirq at both ends, against loopback; not run yet), about three minutes.
set -u
here=$(dirname "$(readlink -f "$0")")
O=${OUT:-/tmp/scale-out}; mkdir -p "$O" /tmp/o
deadline=$(( $(date +%s) + ${BUDGET:-450} ))
{
  echo "== facts $(date -u +%T)"; uname -r; nproc; grep -m1 'model name' /proc/cpuinfo
  for c in /sys/devices/system/cpu/cpu[0-9]*; do
    echo "$(basename $c) core=$(cat $c/topology/core_id) pkg=$(cat $c/topology/physical_package_id) sib=$(cat $c/topology/thread_siblings_list)"
  done
  ls /sys/devices/system/node | grep node; free -g | head -2; cat /proc/loadavg
} > /tmp/o/log.txt 2>&1
run() {
  left=$(( deadline - $(date +%s) ))
  if [ "$left" -lt "$2" ]; then echo "== skipped ${3%%:*}: ${left}s left" >> /tmp/o/log.txt; return; fi
  R=$1 OUT=/tmp/o timeout "$2" bash "$here/scale-run.sh" "$3"
}
export S=${S:-4s} W=${W:-1s} C=${C:-64}
if [ "${LIST:-b}" = next ]; then
  run 3 60 "lo:--topology loopback --modes hash,percpu"
  run 3 60 "rss-shared:--topology veth-rss --server-cpus 0-15 --client-cpus 0-15 --modes hash,percpu"
  run 3 60 "rss:--topology veth-rss --modes hash,percpu"
  run 3 60 "rss-12:--topology veth-rss --server-cpus 0-11 --client-cpus 12-15 --modes hash,percpu"
  run 3 60 "rps:--topology veth-rps --modes hash,percpu"
else
  run 3 60 "lo:--topology loopback --modes hash,percpu"
  run 3 60 "rss:--topology veth-rss --modes hash,percpu"
  run 3 60 "rps:--topology veth-rps --modes hash,percpu"
  run 3 60 "rss-soft:--topology veth-rss --client-rx softirq --modes hash,percpu"
  run 3 100 "lo-nginx:--topology loopback --modes hash,percpu --peer nginx-attach"
  C=128 run 3 60 "rss-c128:--topology veth-rss --modes hash,percpu"
  C=128 run 3 60 "lo-c128:--topology loopback --modes hash,percpu"
fi
echo "== end $(date -u +%T) $(cat /proc/loadavg)" >> /tmp/o/log.txt
tar czf "$O/scale.tgz" -C /tmp o $(cd /tmp && ls -d scale-* 2>/dev/null)
cp /tmp/o/log.txt "$O/log.txt"
