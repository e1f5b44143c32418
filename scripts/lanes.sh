# Shared by the device-session scripts (gpu_session.sh, gpu_h200.sh): the lane bookkeeping and the loop that
# starts ready lanes and reports the running ones. The caller defines S (state dir), T0, DEADLINE and `launch`
# (starts whichever lanes are ready; a lane writes $S/done/started-NAME when started, $S/done/NAME when over).
log() { printf '[%4ds] %s\n' $((SECONDS - T0)) "$*"; }
done_ok() { [ -f "$S/done/$1" ]; }

# poll_lanes POLL_S: until no lane runs (or WAIT_ALL is set) or DEADLINE seconds have passed
poll_lanes() {
    local running f n
    while :; do
        launch
        running=""
        for f in "$S"/done/started-*; do
            [ -e "$f" ] || continue
            n=${f##*started-}; done_ok "$n" || running="$running $n"
        done
        for n in $running; do log "$n: $(tail -c 400 "$S/log/$n.log" | tr '\n\r' '  ' | tail -c 150)"; done
        [ -z "$running" ] && [ -z "${WAIT_ALL:-}" ] && { log "no lane running"; break; }
        [ $((SECONDS - T0)) -ge "$DEADLINE" ] && break
        sleep $(( DEADLINE - (SECONDS - T0) < $1 ? 5 : $1 ))
    done
}
