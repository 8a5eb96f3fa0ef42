#!/bin/bash
# macOS host agent: acts once on a genuine shutdown/abort/test command and acks what it did.
#
# Needs only bash (3.2 as shipped by macOS), mosquitto_sub/mosquitto_pub (brew install
# mosquitto) and openssl. The contract is docs/command-contract.md; nothing from a payload is
# ever executed: actions map to the fixed local commands configured below, and the only
# payload values that reach a command line are validated integers.
#
# Usage: ecoflow-agent.sh [--env-file FILE]
set -u
export LC_ALL=C

VERSION=1.0.0
SETTINGS="AGENT_ID MQTT_HOST MQTT_PORT MQTT_USER MQTT_PASS MQTT_TLS MQTT_TLS_CA
MQTT_SESSION_EXPIRY_SEC COMMAND_SIGNING_KEY CLOCK_SKEW_SEC DRY_RUN DRY_RUN_LOG STATE_DIR
PRE_SHUTDOWN_TIMEOUT_SEC SHUTDOWN_CMD ABORT_CMD PRE_SHUTDOWN_CMD_1 PRE_SHUTDOWN_CMD_2
PRE_SHUTDOWN_CMD_3 PRE_SHUTDOWN_CMD_4 PRE_SHUTDOWN_CMD_5 PRE_SHUTDOWN_CMD_6 PRE_SHUTDOWN_CMD_7
PRE_SHUTDOWN_CMD_8 PRE_SHUTDOWN_CMD_9"

log() { printf '%s %s ecoflow-agent: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$1" "$2" >&2; }
die() { log ERROR "configuration: $1"; exit 2; }

# KEY=VALUE lines, never evaluated; only the agent's own settings; the environment wins.
load_env_file() {
    local line key value
    [ -r "$1" ] || die "cannot read env file $1"
    while IFS= read -r line || [ -n "$line" ]; do
        line=${line#"${line%%[![:space:]]*}"}
        case $line in ''|'#'*) continue ;; 'export '*) line=${line#export } ;; esac
        key=${line%%=*}
        value=${line#*=}
        case " $(echo $SETTINGS) " in *" $key "*) ;; *) log WARNING "ignoring $key in $1"; continue ;; esac
        case $value in \"*\") value=${value#\"}; value=${value%\"} ;; \'*\') value=${value#\'}; value=${value%\'} ;; esac
        [ -n "${!key+x}" ] || printf -v "$key" '%s' "$value"
    done < "$1"
}

is_int() { case $1 in ''|*[!0-9]*) return 1 ;; esac; [ ${#1} -le 10 ]; }
is_true() { case $(printf '%s' "$1" | tr 'A-Z' 'a-z') in 1|true|yes|on) return 0 ;; esac; return 1; }

configure() {
    AGENT_ID=${AGENT_ID:-}
    [ -n "$AGENT_ID" ] || die "AGENT_ID is empty: set it to this host's name in the policy topology"
    [[ $AGENT_ID =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "AGENT_ID='$AGENT_ID': use letters, digits, '.', '_', '-'"
    MQTT_HOST=${MQTT_HOST:-localhost}
    MQTT_TLS_CA=${MQTT_TLS_CA:-}
    TLS=false
    if [ -n "$MQTT_TLS_CA" ] || is_true "${MQTT_TLS:-}"; then TLS=true; fi
    if $TLS; then MQTT_PORT=${MQTT_PORT:-8883}; else MQTT_PORT=${MQTT_PORT:-1883}; fi
    is_int "$MQTT_PORT" || die "MQTT_PORT='$MQTT_PORT' is not a port number"
    MQTT_USER=${MQTT_USER:-$AGENT_ID}
    MQTT_PASS=${MQTT_PASS:-}
    SESSION_EXPIRY=${MQTT_SESSION_EXPIRY_SEC:-3600}
    is_int "$SESSION_EXPIRY" || die "MQTT_SESSION_EXPIRY_SEC is not an integer"
    KEY=${COMMAND_SIGNING_KEY:-}
    SKEW=${CLOCK_SKEW_SEC:-60}
    is_int "$SKEW" || die "CLOCK_SKEW_SEC='$SKEW' is not an integer"
    DRY=false
    if is_true "${DRY_RUN:-}"; then DRY=true; fi
    STATE=${STATE_DIR:-/var/db/ecoflow-agent}
    DRYLOG=${DRY_RUN_LOG:-$STATE/dry-run.jsonl}
    PRE_TIMEOUT=${PRE_SHUTDOWN_TIMEOUT_SEC:-60}
    is_int "$PRE_TIMEOUT" || die "PRE_SHUTDOWN_TIMEOUT_SEC is not an integer"
    # Quoted: an unquoted '}' in the default would end the expansion and be appended to a
    # value that is set.
    SHUTDOWN_CMD=${SHUTDOWN_CMD:-'shutdown -h +{delay_min}'}
    ABORT_SET=${ABORT_CMD:-}
    # macOS shutdown(8) has no -c: a pending shutdown is cancelled by ending its process.
    ABORT_CMD=${ABORT_CMD:-killall shutdown}
    classify_shutdown_cmd
    PRE_COUNT=0
    local n v
    for n in 1 2 3 4 5 6 7 8 9; do
        v=PRE_SHUTDOWN_CMD_$n
        [ -n "${!v:-}" ] && PRE_COUNT=$((PRE_COUNT + 1))
    done
    HOST=$(hostname)
    PREFIX="power-manager/$AGENT_ID"
    CLIENT_ID="ecoflow-agent-$AGENT_ID"
}

# How SHUTDOWN_CMD is used (docs/agents.md, "SHUTDOWN_CMD"): with a {delay_min}/{delay_sec}
# placeholder it is an OS halt timer, set when a shutdown is accepted and cancelled by
# ABORT_CMD (SHUTDOWN_MODE=timer); a known immediate halt such as the earlier tool's
# "shutdown -h now" is run at the commit point, after the pre-shutdown commands
# (SHUTDOWN_MODE=commit); anything else is refused at start, saying what to write instead.
classify_shutdown_cmd() {
    local -a argv
    local prog a short='' recommended
    read -r -a argv <<< "$SHUTDOWN_CMD"
    prog=${argv[0]##*/}
    for a in "${argv[@]:1}"; do case $a in --*) ;; -*) short="$short${a#-}" ;; esac; done
    recommended="write SHUTDOWN_CMD=shutdown -h +{delay_min} (recommended: the OS halts even if the agent dies) or SHUTDOWN_CMD=shutdown -h now (halts at the commit point, after the PRE_SHUTDOWN_CMD_n commands)"
    if [ "$prog" = reboot ] \
        || { [ "$prog" = shutdown ] && { [[ $short == *r* ]] || [[ " ${argv[*]} " == *" --reboot "* ]]; }; } \
        || { [ "$prog" = systemctl ] && [[ ${argv[1]:-} =~ ^(reboot|kexec|soft-reboot)$ ]]; }; then
        die "SHUTDOWN_CMD='$SHUTDOWN_CMD' restarts the host instead of halting it (it would come back up on battery): $recommended"
    fi
    case $SHUTDOWN_CMD in *'{delay_min}'*|*'{delay_sec}'*)
        if [ "$prog" != shutdown ] && [ -z "$ABORT_SET" ]; then
            die "SHUTDOWN_CMD='$SHUTDOWN_CMD' sets a halt timer but ABORT_CMD is not set, so an abort could not cancel it: set ABORT_CMD to the command that cancels this timer, or write SHUTDOWN_CMD=shutdown -h +{delay_min} (cancelled by the default ABORT_CMD=killall shutdown)"
        fi
        SHUTDOWN_MODE=timer
        return ;;
    esac
    if is_immediate_halt "$prog" "${argv[@]:1}"; then
        SHUTDOWN_MODE=commit
        return
    fi
    die "SHUTDOWN_CMD='$SHUTDOWN_CMD' is neither a halt timer (a command with {delay_min} or {delay_sec}) nor a known immediate halt (shutdown -h now, shutdown -h 0, poweroff, halt, systemctl poweroff): $recommended"
}

is_immediate_halt() { # program args...
    local prog=$1 a at=''
    shift
    case $prog in
    shutdown) # shutdown [-h|-P|-H] now|0|+0 [wall message]
        for a; do
            case $a in
            -h|-P|-H|--halt|--poweroff|--no-wall) [ -z "$at" ] || return 1 ;;
            -*) return 1 ;;
            now|0|+0) [ -n "$at" ] || at=$a ;;
            *) [ -n "$at" ] || return 1 ;;
            esac
        done
        [ -n "$at" ] ;;
    poweroff|halt)
        for a; do case $a in -p|--poweroff|--no-wall) ;; *) return 1 ;; esac; done ;;
    systemctl)
        case ${1:-} in poweroff|halt) shift ;; *) return 1 ;; esac
        for a; do [ "$a" = --no-wall ] || return 1; done ;;
    *) return 1 ;;
    esac
}

# Client settings go to option files that mosquitto_sub/pub read from XDG_CONFIG_HOME, so
# the password is never on a command line (visible in ps).
write_client_config() {
    local dir=$STATE/mqtt-client f opts
    mkdir -p "$dir" && chmod 700 "$dir"
    opts="-h $MQTT_HOST
-p $MQTT_PORT
-u $MQTT_USER
-V mqttv5"
    [ -n "$MQTT_PASS" ] && opts="$opts
-P $MQTT_PASS"
    if $TLS; then
        if [ -n "$MQTT_TLS_CA" ]; then opts="$opts
--cafile $MQTT_TLS_CA"; else opts="$opts
--tls-use-os-certs"; fi
    fi
    for f in mosquitto_sub mosquitto_pub; do
        (umask 077; printf '%s\n' "$opts" > "$dir/$f")
    done
    export XDG_CONFIG_HOME=$dir
}

# -- contract --------------------------------------------------------------------------------
# Strings in a command are printable ASCII without '"' and '\' (the contract's alphabet), so
# every '"' is a delimiter and a field can be read with a pattern; each must occur once.
json_field() { # payload name -> value on stdout; string or integer
    local re_s="\"$2\"[[:space:]]*:[[:space:]]*\"([^\"]*)\"" re_i="\"$2\"[[:space:]]*:[[:space:]]*(-?[0-9]+)[[:space:]]*[,}]"
    local rest
    if [[ $1 =~ $re_s ]] || [[ $1 =~ $re_i ]]; then
        rest=${1#*\"$2\"}
        case $rest in *\"$2\"*) return 2 ;; esac
        printf '%s' "${BASH_REMATCH[1]}"
        return 0
    fi
    return 1
}

# HMAC-SHA256 built from two plain SHA-256 runs, so the key is never an openssl argument.
make_pads() {
    local hex byte i ipad='' opad=''
    if [ "$(printf '%s' "$KEY" | wc -c)" -gt 64 ]; then
        hex=$(printf '%s' "$KEY" | openssl dgst -sha256 -binary | od -An -v -tu1)
    else
        hex=$(printf '%s' "$KEY" | od -An -v -tu1)
    fi
    i=0
    for byte in $hex; do
        ipad="$ipad$(printf '\\x%02x' $((byte ^ 0x36)))"
        opad="$opad$(printf '\\x%02x' $((byte ^ 0x5c)))"
        i=$((i + 1))
    done
    while [ $i -lt 64 ]; do ipad="$ipad\\x36"; opad="$opad\\x5c"; i=$((i + 1)); done
    IPAD=$ipad
    OPAD=$opad
}

hmac_hex() { # text -> lowercase hex
    { printf "$OPAD"; { printf "$IPAD"; printf '%s' "$1"; } | openssl dgst -sha256 -binary; } \
        | openssl dgst -sha256 -r | cut -c1-64
}

canonical() {
    printf 'ecoflow-cmd-v1\n%s\n%s\n%s\n%s\n%s\n%s\n%s\n%s\n%s' "$C_agent" "$C_id" "$C_action" \
        "$C_delay_sec" "$C_ttl_sec" "$C_issued_at" "$C_episode_id" "$C_cancels" "$C_reason"
}

# -- MQTT output -----------------------------------------------------------------------------
status_json() {
    printf '{"state": "%s", "agent": "%s", "version": "%s", "platform": "macos", "host": "%s", "ts": %s, "dry_run": %s}' \
        "$1" "$AGENT_ID" "$VERSION" "$(json_safe "$HOST")" "$(date +%s)" "$DRY"
}

json_safe() { printf '%s' "$1" | tr -d '"\\' | tr -c '[:print:]' ' '; }

publish() { # topic payload [retain]
    if [ "${3:-}" = retain ]; then
        mosquitto_pub -q 1 -r -t "$1" -m "$2" || log ERROR "could not publish to $1"
    else
        mosquitto_pub -q 1 -t "$1" -m "$2" || log ERROR "could not publish to $1"
    fi
}

ack() { # id status detail
    publish "$PREFIX/ack" "$(printf '{"id": "%s", "agent": "%s", "status": "%s", "host": "%s", "ts": %s, "detail": "%s"}' \
        "$1" "$AGENT_ID" "$2" "$(json_safe "$HOST")" "$(date +%s)" "$(json_safe "$3")")"
}

# -- local effects ---------------------------------------------------------------------------
json_argv() {
    local out='' a
    for a in "$@"; do out="$out${out:+, }\"$(printf '%s' "$a" | sed 's/\\/\\\\/g; s/"/\\"/g')\""; done
    printf '[%s]' "$out"
}

# run STEP COMMAND_ID TIMEOUT ARGV... ; the argv comes from local settings only.
run_step() {
    local step=$1 cid=$2 limit=$3 pid watchdog rc
    shift 3
    if $DRY; then
        printf '{"ts": %s, "agent": "%s", "command_id": "%s", "step": "%s", "argv": %s}\n' \
            "$(date +%s)" "$AGENT_ID" "$cid" "$step" "$(json_argv "$@")" >> "$DRYLOG"
        log INFO "dry run: $step for $cid would run $*"
        return 0
    fi
    log INFO "$step for $cid: running $*"
    "$@" < /dev/null > /dev/null 2>&1 &
    pid=$!
    ( sleep "$limit"; kill -KILL "$pid" 2>/dev/null ) &
    watchdog=$!
    wait "$pid"
    rc=$?
    kill "$watchdog" 2>/dev/null
    if [ $rc -ne 0 ]; then
        log ERROR "$step for $cid: $1 exited $rc"
        STEP_DETAIL="$1 exited $rc"
        return 1
    fi
    return 0
}

shutdown_argv() { # delay_sec -> sets ARGV
    local halt=$(( $1 + PRE_TIMEOUT * PRE_COUNT )) i
    # shutdown(8) counts in whole minutes: round up so the halt never comes early.
    local minutes=$(( (halt + 59) / 60 ))
    read -r -a ARGV <<< "$SHUTDOWN_CMD"
    for i in "${!ARGV[@]}"; do
        ARGV[$i]=${ARGV[$i]//\{delay_sec\}/$halt}
        ARGV[$i]=${ARGV[$i]//\{delay_min\}/$minutes}
    done
}

# The window: a background timer that reaches the commit point unless an abort kills it.
commit() { # id mode
    local cid=$1 mode=$2 n v failures='' ok=0
    printf '%s\n' "$cid" >> "$STATE/committed-ids"
    rm -f "$STATE/pending"
    log INFO "shutdown $cid reached its commit point: no abort from now on"
    for n in 1 2 3 4 5 6 7 8 9; do
        v=PRE_SHUTDOWN_CMD_$n
        [ -n "${!v:-}" ] || continue
        read -r -a ARGV <<< "${!v}"
        if run_step "pre_shutdown_$n" "$cid" "$PRE_TIMEOUT" "${ARGV[@]}"; then
            ok=$((ok + 1))
        else
            failures="$failures${failures:+; }PRE_SHUTDOWN_CMD_$n: $STEP_DETAIL"
        fi
    done
    if $DRY; then v=dry_run; else v=executing; fi
    if [ "$mode" = timer ]; then
        ack "$cid" "$v" "commit point reached; pre-shutdown: ${failures:-$ok ok}"
        return
    fi
    # Halt last; the ack goes out first, as the host may not get another chance.
    ack "$cid" "$v" "commit point reached; pre-shutdown: ${failures:-$ok ok}; halting now"
    shutdown_argv 0
    if ! run_step shutdown "$cid" 60 "${ARGV[@]}"; then
        log ERROR "shutdown $cid: SHUTDOWN_CMD failed, the host is NOT halting: $STEP_DETAIL"
        ack "$cid" rejected "SHUTDOWN_CMD failed: $STEP_DETAIL"
    fi
}

arm() { # id commit_at mode (timer: SHUTDOWN_CMD already set the OS timer; commit: halt then)
    printf '%s %s %s\n' "$1" "$2" "$3" > "$STATE/pending.tmp" && mv "$STATE/pending.tmp" "$STATE/pending"
    local wait_for=$(( $2 - $(date +%s) ))
    [ $wait_for -lt 0 ] && wait_for=0
    ( trap 'exit 0' TERM; sleep "$wait_for" & wait $!; commit "$1" "$3" ) &
    TIMER_PID=$!
    printf '%s\n' "$TIMER_PID" > "$STATE/pending.pid"
}

remember() { printf '%s %s\n' "$1" "$(date +%s)" >> "$STATE/executed-ids"; sync; }
seen() { [ -f "$STATE/executed-ids" ] && cut -d' ' -f1 "$STATE/executed-ids" | grep -Fxq -- "$1"; }

handle() { # retain_flag payload
    local retained=$1 payload=$2 f v where now expected target pending_id pending_at pending_mode
    # The id, when there is a usable one, so that even a malformed command gets its ack.
    C_id=$(json_field "$payload" id) || C_id=''
    [[ $C_id =~ ^[[:print:]]{1,200}$ ]] && [[ $C_id != *\\* ]] || C_id=''
    if [[ $payload =~ [^[:print:]] ]] || [[ $payload == *\\* ]] || [ ${#payload} -gt 4096 ]; then
        log WARNING "command '$C_id' rejected: malformed (characters outside the contract's alphabet)"
        ack "$C_id" rejected "malformed: characters outside the contract's alphabet"
        return
    fi
    for f in agent action episode_id cancels reason v delay_sec ttl_sec issued_at sig; do
        if v=$(json_field "$payload" $f); then
            printf -v "C_$f" '%s' "$v"
        else
            case $f in episode_id|cancels|reason|sig) printf -v "C_$f" '%s' '' ;;
            *) log WARNING "command '$C_id' rejected: malformed ($f missing)"
               ack "$C_id" rejected "malformed: $f missing or not valid"; return ;;
            esac
        fi
    done
    where="command $C_id ($C_action, episode ${C_episode_id:--})"
    if [ -z "$C_id" ] || [ "$C_v" != 1 ] || ! is_int "$C_delay_sec" || ! is_int "$C_ttl_sec" \
        || ! is_int "$C_issued_at" || [ "$C_delay_sec" -gt 86400 ] || [ "$C_ttl_sec" -lt 1 ] \
        || [ "$C_ttl_sec" -gt 86400 ]; then
        log WARNING "$where rejected: malformed"
        ack "$C_id" rejected "malformed: bad id, version or number"
        return
    fi
    case $C_action in shutdown|abort|test) ;; *)
        log WARNING "$where rejected: unknown action"; ack "$C_id" rejected "malformed: unknown action"; return ;;
    esac
    if [ "$retained" != 0 ]; then
        log WARNING "$where rejected: retained (commands are never retained)"
        ack "$C_id" rejected retained
        return
    fi
    if [ "$C_agent" != "$AGENT_ID" ]; then
        log WARNING "$where rejected: addressed to $C_agent"
        ack "$C_id" rejected "wrong agent"
        return
    fi
    if [ -n "$KEY" ]; then
        if [ -z "$C_sig" ]; then
            log WARNING "$where rejected: missing signature"
            ack "$C_id" rejected "missing signature"
            return
        fi
        expected=$(hmac_hex "$(canonical)")
        if [ "$expected" != "$(printf '%s' "$C_sig" | tr 'A-F' 'a-f')" ]; then
            log WARNING "$where rejected: bad signature"
            ack "$C_id" rejected "bad signature"
            return
        fi
    fi
    now=$(date +%s)
    if [ "$now" -gt $((C_issued_at + C_ttl_sec + SKEW)) ]; then
        log WARNING "$where expired: issued $((now - C_issued_at)) s ago, ttl $C_ttl_sec s"
        ack "$C_id" expired expired
        return
    fi
    if [ "$C_issued_at" -gt $((now + SKEW)) ]; then
        log WARNING "$where rejected: issued in the future"
        ack "$C_id" rejected "issued in the future (check the clocks)"
        return
    fi
    if seen "$C_id"; then
        log INFO "$where ignored: already handled (redelivery)"
        ack "$C_id" rejected duplicate
        return
    fi
    pending_id='' pending_at=0 pending_mode=''
    [ -f "$STATE/pending" ] && read -r pending_id pending_at pending_mode < "$STATE/pending"
    case $C_action in
    abort)
        target=$C_cancels
        if { [ -f "$STATE/committed-ids" ] && grep -Fxq -- "$target" "$STATE/committed-ids"; } \
            || { [ "$pending_id" = "$target" ] && [ "$now" -ge "$pending_at" ]; }; then
            log WARNING "$where refused: shutdown $target is past its commit point"
            ack "$C_id" rejected "abort after commit point"
            return
        fi
        if [ -z "$target" ] || [ "$pending_id" != "$target" ]; then
            log WARNING "$where rejected: no pending shutdown '$target'"
            ack "$C_id" rejected "no pending shutdown '$target'"
            return
        fi
        remember "$C_id"
        [ -f "$STATE/pending.pid" ] && kill "$(cat "$STATE/pending.pid")" 2>/dev/null
        rm -f "$STATE/pending" "$STATE/pending.pid"
        if [ "$pending_mode" = commit ]; then
            # Nothing was handed to the OS: cancelling the agent's window is the whole abort.
            log INFO "$where: shutdown $target aborted"
            if $DRY; then ack "$C_id" aborted "cancelled $target (dry run)"
            else ack "$C_id" aborted "cancelled $target"; fi
            return
        fi
        read -r -a ARGV <<< "$ABORT_CMD"
        if run_step abort "$C_id" 60 "${ARGV[@]}"; then
            log INFO "$where: shutdown $target aborted"
            if $DRY; then ack "$C_id" aborted "cancelled $target (dry run)"
            else ack "$C_id" aborted "cancelled $target"; fi
        else
            ack "$C_id" rejected "ABORT_CMD failed: $STEP_DETAIL"
        fi
        ;;
    test)
        remember "$C_id"
        shutdown_argv 0
        log INFO "$where accepted: test"
        if [ "$SHUTDOWN_MODE" = timer ]; then ack "$C_id" received "test ok: would run ${ARGV[*]}"
        else ack "$C_id" received "test ok: would run ${ARGV[*]} at the commit point, after the pre-shutdown commands"; fi
        ;;
    shutdown)
        if [ -n "$pending_id" ]; then
            log WARNING "$where rejected: shutdown $pending_id already scheduled"
            ack "$C_id" rejected "shutdown $pending_id already pending"
            return
        fi
        remember "$C_id"
        log INFO "$where accepted: ${C_reason:-no reason given}"
        if [ "$SHUTDOWN_MODE" = timer ]; then
            shutdown_argv "$C_delay_sec"
            # The OS timer is set first, so the host halts even if this agent dies in the window.
            if ! run_step shutdown "$C_id" 60 "${ARGV[@]}"; then
                ack "$C_id" rejected "SHUTDOWN_CMD failed: $STEP_DETAIL"
                return
            fi
        fi
        # An immediate halt (SHUTDOWN_CMD=shutdown -h now) waits for the commit point.
        arm "$C_id" $((now + C_delay_sec)) "$SHUTDOWN_MODE"
        if $DRY; then v=dry_run; else v=scheduled; fi
        log INFO "$where $v: commit point in $C_delay_sec s"
        ack "$C_id" "$v" "shutdown in $C_delay_sec s; abort possible until $((now + C_delay_sec))"
        ;;
    esac
}

decode_hex() { # hex payload -> text; tabs and line breaks become spaces
    printf "$(printf '%s' "$1" | sed 's/0[9ad]/20/g; s/../\\x&/g')"
}

main() {
    if [ "${1:-}" = --env-file ]; then load_env_file "${2:-}"; fi
    configure
    [ -n "$KEY" ] || log WARNING "COMMAND_SIGNING_KEY is not set: commands are not authenticated"
    mkdir -p "$STATE" && chmod 700 "$STATE" || die "cannot create $STATE"
    write_client_config
    make_pads
    log INFO "agent $AGENT_ID starting (dry run: $DRY, tls: $TLS, broker $MQTT_HOST:$MQTT_PORT)"
    if [ "$SHUTDOWN_MODE" = timer ]; then
        log INFO "SHUTDOWN_CMD $SHUTDOWN_CMD is set as an OS timer when a shutdown is accepted"
    else
        log INFO "SHUTDOWN_CMD $SHUTDOWN_CMD is run at the commit point, after the pre-shutdown commands"
    fi
    if [ -f "$STATE/pending" ]; then
        read -r pending_id pending_at pending_mode < "$STATE/pending"
        log INFO "resuming the window of shutdown $pending_id"
        # A file written before the halt-at-commit mode existed always meant an OS timer.
        arm "$pending_id" "$pending_at" "${pending_mode:-timer}"
    fi
    # A fixed client id and a persistent session (-c -i -x): commands sent during a short
    # disconnect are queued by the broker. --retain-as-published keeps the retain flag, so a
    # retained command is seen as one and refused.
    SUB_OPTS=(-c -i "$CLIENT_ID" -x "$SESSION_EXPIRY" -k 30 -q 1 --retain-as-published
        -t "$PREFIX/cmd" -F 'MSG %t %r %x')
    # First a short run that exits once subscribed (-E): from then on the session holds the
    # subscription, and commands queued while the agent was away are handled first.
    mosquitto_sub "${SUB_OPTS[@]}" -E > "$STATE/first.out" 2>&1 \
        || { log ERROR "cannot subscribe: $(cat "$STATE/first.out")"; exit 1; }
    while IFS= read -r line; do dispatch "$line"; done < "$STATE/first.out"
    FIFO=$STATE/sub.fifo
    rm -f "$FIFO" && mkfifo -m 600 "$FIFO"
    # The clients say nothing when they (re)connect, so the subscriber also watches this
    # agent's own status: whenever it shows "offline" (the probe below, or the Last Will after
    # a lost connection) the subscriber is connected with its Will armed, and "online" is due.
    mosquitto_sub "${SUB_OPTS[@]}" -t "$PREFIX/status" --will-topic "$PREFIX/status" \
        --will-payload "$(status_json offline)" --will-qos 1 --will-retain > "$FIFO" 2>&1 &
    SUB_PID=$!
    WATCH_PID=''
    if command -v lsof > /dev/null; then
        watch_connection "$SUB_PID" &
        WATCH_PID=$!
    else
        log WARNING "lsof not found: after a reconnect \"online\" is announced only if the broker kept this agent's status"
        publish "$PREFIX/status" "$(status_json offline)" retain
    fi
    trap 'kill $SUB_PID $WATCH_PID 2>/dev/null; publish "$PREFIX/status" "$(status_json offline)" retain; exit 0' TERM INT
    while IFS= read -r line; do dispatch "$line"; done < "$FIFO" &
    wait $!
    log ERROR "mosquitto_sub ended; exiting so launchd restarts the agent"
    kill $SUB_PID $WATCH_PID 2>/dev/null
    exit 1
}

# mosquitto_sub reconnects by itself, once a second, but says nothing when it does; and a
# broker that lost its retained messages (restarted without persistence) has no status to
# echo back, so "online" would never be announced again. So watch the subscriber's TCP
# connection (a local look, no broker traffic): whenever it is a new one, the first included,
# announce "offline" and let its echo prove the subscription (dispatch then says "online").
watch_connection() { # subscriber pid
    local last='' now
    while kill -0 "$1" 2>/dev/null; do
        now=$(lsof -a -n -P -p "$1" -iTCP -sTCP:ESTABLISHED -Fn 2>/dev/null | grep '^n' | head -n 1)
        if [ -n "$now" ] && [ "$now" != "$last" ]; then
            [ -n "$last" ] && log INFO "reconnected to the broker"
            publish "$PREFIX/status" "$(status_json offline)" retain
            last=$now
        fi
        sleep 1
    done
}

dispatch() { # one line of mosquitto_sub output
    local line=$1 topic flag hex
    case $line in
    'MSG '*)
        read -r _ topic flag hex <<< "$line"
        case $hex in *[!0-9a-f]*) log WARNING "unreadable message on $topic"; return ;; esac
        if [ "$topic" = "$PREFIX/status" ]; then
            case $(decode_hex "$hex") in *'"state": "offline"'*)
                log INFO "connected and subscribed to $PREFIX/cmd as $MQTT_USER"
                publish "$PREFIX/status" "$(status_json online)" retain ;;
            esac
        else
            handle "$flag" "$(decode_hex "$hex")"
        fi
        ;;
    ?*) log WARNING "mosquitto_sub: $line" ;;
    esac
}

main "$@"
