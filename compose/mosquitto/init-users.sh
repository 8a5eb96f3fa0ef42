#!/bin/sh
# The broker's password file, made from compose/.env on every `docker compose up` by the
# one-shot mosquitto-users service (eclipse-mosquitto image, Mosquitto's own mosquitto_passwd);
# the broker starts only after it exits 0 and reads the file from the mosquitto-users volume.
#
# Users: the stack's own services (policy, collector, and when their passwords are set the
# bridge/simulator and the demo agent), plus every user of compose/mosquitto/passwd if that
# file exists (host agents added with scripts/add-mqtt-user). POSIX sh (busybox in the image).
# Paths can be moved for tests: MOSQUITTO_CONFIG_DIR, MOSQUITTO_USERS_DIR.
set -eu

config_dir=${MOSQUITTO_CONFIG_DIR:-/mosquitto/config}
users_dir=${MOSQUITTO_USERS_DIR:-/mosquitto/users}
target=$users_dir/passwd
work=$users_dir/passwd.new

fail() {
    echo "mosquitto-users: $*" >&2
    rm -f "$work"
    exit 1
}

# The two users every profile needs; compose refuses to start without them too.
for required in POLICY_MQTT_PASS COLLECTOR_MQTT_PASS; do
    eval "value=\${$required:-}"
    if [ -z "$value" ]; then
        fail "$required is empty: set it in compose/.env, or run scripts/stack-up, which" \
             "fills every empty password"
    fi
done

umask 077
rm -f "$work"
if [ -f "$config_dir/passwd" ]; then
    cp "$config_dir/passwd" "$work"
else
    : > "$work"
fi

# add NAME PASSWORD VARIABLE: the password goes through mosquitto_passwd's prompt (stdin),
# never on a command line.
add() {
    case $1 in
        '' | *:* | *' '*) fail "$3: user name '$1' is empty or holds ':' or a space" ;;
    esac
    if [ -z "$2" ]; then
        echo "mosquitto-users: $3 is empty: user $1 not created (profiles bridge, demo and" \
             "ha need it)" >&2
        return 0
    fi
    printf '%s\n%s\n' "$2" "$2" | mosquitto_passwd "$work" "$1" > /dev/null \
        || fail "mosquitto_passwd could not add user $1"
    made="$made $1"
}

made=
add "${POLICY_MQTT_USER:-policy}" "${POLICY_MQTT_PASS:-}" POLICY_MQTT_PASS
add "${COLLECTOR_MQTT_USER:-collector}" "${COLLECTOR_MQTT_PASS:-}" COLLECTOR_MQTT_PASS
add "${BRIDGE_MQTT_USER:-bridge}" "${BRIDGE_MQTT_PASS:-}" BRIDGE_MQTT_PASS
add "${DEMO_AGENT_ID:-demo-host}" "${DEMO_AGENT_MQTT_PASS:-}" DEMO_AGENT_MQTT_PASS
add "${HA_MQTT_USER:-ecoflow-ha}" "${HA_MQTT_PASS:-}" HA_MQTT_PASS
add "${HOMEASSISTANT_MQTT_USER:-homeassistant}" "${HOMEASSISTANT_MQTT_PASS:-}" HOMEASSISTANT_MQTT_PASS

# The broker runs as uid 1883 and must read the file; nobody else may.
if [ "$(id -u)" = 0 ]; then
    chown 1883:1883 "$work"
fi
chmod 600 "$work"
mv -f "$work" "$target"
kept=
if [ -f "$config_dir/passwd" ]; then
    kept=" and kept the users of compose/mosquitto/passwd"
fi
echo "mosquitto-users: wrote$made$kept to the broker's password file"
