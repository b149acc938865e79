# Per row: median over repetitions of each lock group's wait per connection (ns), from the probe's
# per-site records. Groups are by kernel function; see README "On 16 CPUs".
def group:
  if (.site | IN("__inet_inherit_port", "inet_put_port", "inet_twsk_hashdance_schedule", "inet_twsk_kill"))
    then "server-port bind bucket"
  elif (.site | IN("alloc_fd", "put_unused_fd", "file_close_fd")) then "fd table (\(.side))"
  elif (.site | IN("__inet_hash_connect", "__inet_check_established")) then "client port search"
  elif .listener then "listener"
  elif (.site | IN("lock_sock_nested", "sockopt_lock_sock", "release_sock")) then "socket locks"
  elif (.site | IN("__schedule", "__task_rq_lock", "try_to_wake_up", "raw_spin_rq_lock_nested")) then "runqueues"
  elif (.site | IN("ep_poll_callback", "__wake_up_common_lock", "__wake_up_sync_key", "ep_start_scan", "ep_done_scan")) then "wake-ups, epoll"
  else "other" end;
def median: sort | .[(length / 2 | floor)];
.runs | group_by(.row)[] | .[0].row as $row
| [.[] | .load.requests as $n
   | ((.probes.locks // []) | group_by(group) | map({key: (.[0] | group), value: ((map(.wait_ns) | add) / $n)}) | from_entries)
     + {total: (.probes.lock_wait_ns / $n)}]
| (map(keys) | add | unique) as $groups
| "\($row): " + ([$groups[] as $g | "\($g) \([.[] | .[$g] // 0] | median | round)"] | join(", "))
