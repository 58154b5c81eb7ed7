#!/bin/sh
# Test host agent: runs the scripts the harness drops into WORK/queue, one at a time, in order.
# NAME.sh is claimed by renaming it to NAME.run; its output goes to NAME.out and its exit status
# to NAME.rc (written last, atomically). A file named "quit" ends the agent.
work=$1
q="$work/queue"
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root TMPDIR=/tmp
cd /
touch "$q/agent.ready"
echo "lightbyte-testhost: agent ready"
while :; do
  for s in "$q"/*.sh; do
    [ -e "$s" ] || continue
    n=${s%.sh}
    mv "$s" "$n.run" || continue
    sh "$n.run" > "$n.out" 2>&1 < /dev/null
    echo $? > "$n.rc.tmp"
    mv "$n.rc.tmp" "$n.rc"
  done
  [ -e "$q/quit" ] && break
  sleep 0.05
done
