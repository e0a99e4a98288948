#!/bin/bash
# Installs speakerd as a systemd service on Raspberry Pi OS / Debian (bookworm, trixie).
# Safe to run again: it upgrades the code and keeps your config and key.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sudo ./install.sh [options]

Installs apt dependencies, the system user "speakerd" (groups audio, gpio), a venv
in /opt/speakerd, the unit speakerd.service, /etc/speakerd/speakerd.toml (only if
absent) and the API key, then enables and starts the service.

options:
  --api-key-file FILE  install FILE as the API key (/etc/speakerd/openai.key, 0600 root)
  --no-start           install but do not enable or start the service
  --uninstall          stop and remove the service and /opt/speakerd (keeps /etc/speakerd)
  --purge              with --uninstall: also remove /etc/speakerd and the speakerd user
  --root DIR           install into the staging tree DIR: no apt, no systemctl; the user
                       is created only if DIR/etc/passwd exists (for tests and packaging)
  --python PATH        interpreter for the venv (default: /usr/bin/python3)
  --no-deps            pip installs speakerd alone; its dependencies must already be
                       importable (through --system-site-packages)
  -h, --help           this text
EOF
}

root="" start=1 uninstall=0 purge=0 key_file="" no_deps=0 python=/usr/bin/python3
while [ $# -gt 0 ]; do
    case $1 in
        --api-key-file) key_file=${2:?--api-key-file needs a file}; shift ;;
        --no-start) start=0 ;;
        --uninstall) uninstall=1 ;;
        --purge) purge=1 ;;
        --root) root=$(realpath -m "${2:?--root needs a directory}"); shift ;;
        --python) python=${2:?--python needs a path}; shift ;;
        --no-deps) no_deps=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
prefix=$root/opt/speakerd
venv=$prefix/venv
etc=$root/etc/speakerd
unit_dir=$root/etc/systemd/system

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    die "run as root: sudo $0 $*"
fi
if [ -n "$key_file" ] && [ ! -r "$key_file" ]; then
    die "--api-key-file $key_file: not a readable file"
fi

# useradd/groupadd work on a staging tree only when it has its own user database.
has_users() { [ -z "$root" ] || [ -f "$root/etc/passwd" ]; }
root_args() { if [ -n "$root" ]; then echo --root "$root"; fi; }

group_id() {
    local name=$1
    if has_users; then
        awk -F: -v n="$name" '$1 == n { print $3 }' "$root/etc/group"
    else
        echo 0
    fi
}

# Keeps the apt prompt quiet and the list fresh only once per run.
apt_install() {
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

install_packages() {
    [ -z "$root" ] || return 0
    say "installing apt packages"
    apt-get update
    # Build dependencies of pyalsaaudio and systemd-python, and the venv itself.
    apt_install python3 python3-venv python3-dev gcc pkg-config \
        libasound2-dev libsystemd-dev alsa-utils
    # The voice of the spoken status phrases ("Sorry, I can't reach the internet").
    apt_install espeak-ng
    # The linear echo filter behind voice barge-in (speakerd/audio/speex_echo.py).
    apt_install libspeexdsp1
    # gpiozero drives pins through lgpio. PyPI has lgpio wheels only for some
    # Pythons (none for 3.13, trixie's), so use the distro's package through
    # the venv's --system-site-packages on every release.
    # APA102 LED rings: gpiozero uses the kernel's SPI driver through spidev, else
    # it falls back to bit-banging the pins, which costs as much CPU as the wake word.
    if apt-cache show python3-spidev >/dev/null 2>&1; then
        apt_install python3-spidev
    fi
    if apt-cache show python3-lgpio >/dev/null 2>&1; then
        apt_install python3-lgpio
    else
        say "python3-lgpio is not in this distribution's archive: LEDs and buttons stay off"
    fi
}

create_user() {
    if ! has_users; then
        say "no $root/etc/passwd: not creating the speakerd user in the staging tree"
        return 0
    fi
    # Raspberry Pi OS has a gpio group; plain Debian does not, and the unit's
    # SupplementaryGroups= fails on a group that does not exist.
    # shellcheck disable=SC2046
    [ -n "$(group_id gpio)" ] || groupadd $(root_args) --system gpio
    # shellcheck disable=SC2046
    [ -n "$(group_id spi)" ] || groupadd $(root_args) --system spi
    if [ -z "$(awk -F: '$1 == "speakerd"' "$root/etc/passwd")" ]; then
        say "creating system user speakerd (groups audio, gpio, spi)"
        # shellcheck disable=SC2046
        useradd $(root_args) --system --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin --user-group --groups audio,gpio,spi speakerd
    else
        # shellcheck disable=SC2046
        usermod $(root_args) --append --groups audio,gpio,spi speakerd
    fi
}

install_venv() {
    install -d -m 0755 -o root -g root "$prefix"
    if [ ! -x "$venv/bin/python" ]; then
        say "creating the venv in ${venv#"$root"}"
        "$python" -m venv --system-site-packages "$venv"
    fi
    local pip_args=(--quiet --disable-pip-version-check)
    if [ "$no_deps" -eq 1 ]; then
        pip_args+=(--no-deps)
    fi
    say "installing speakerd into the venv"
    # A copy, not the source tree: the service must not depend on where this script lives.
    "$venv/bin/pip" install "${pip_args[@]}" --upgrade "$src"
    # The unit's Documentation= points here.
    install -m 0644 -o root -g root "$src/README.md" "$prefix/README.md"
    # `speakerd config --check` as the README says it, from any shell and through sudo.
    install -d -m 0755 "$root/usr/local/bin"
    ln -sfn /opt/speakerd/venv/bin/speakerd "$root/usr/local/bin/speakerd"
}

install_config() {
    local gid
    gid=$(group_id speakerd)
    gid=${gid:-0}
    install -d -m 0750 -o root -g "$gid" "$etc"
    if [ -e "$etc/speakerd.toml" ]; then
        say "keeping your /etc/speakerd/speakerd.toml"
    else
        install -m 0640 -o root -g "$gid" "$src/config/speakerd.toml" "$etc/speakerd.toml"
        say "installed the default /etc/speakerd/speakerd.toml"
    fi
    if [ -n "$key_file" ]; then
        install -m 0600 -o root -g root "$key_file" "$etc/openai.key"
        say "installed the API key from $key_file"
    elif [ -s "$etc/openai.key" ]; then
        say "keeping the API key in /etc/speakerd/openai.key"
    elif [ -z "$root" ] && [ -t 0 ]; then
        local key
        read -r -s -p "OpenAI API key (empty to set it later): " key
        echo
        (umask 077 && printf '%s\n' "$key" >"$etc/openai.key")
    fi
    # LoadCredential= refuses to start the unit without the file; empty means "not set yet".
    if [ ! -e "$etc/openai.key" ]; then
        (umask 077 && : >"$etc/openai.key")
    fi
    chown root:root "$etc/openai.key"
    chmod 0600 "$etc/openai.key"
    if [ ! -s "$etc/openai.key" ]; then
        say "no API key yet: write it to /etc/speakerd/openai.key (chmod 600), then" \
            "systemctl restart speakerd"
    fi
}

install_unit() {
    install -d -m 0755 "$unit_dir"
    install -m 0644 -o root -g root "$src/systemd/speakerd.service" "$unit_dir/speakerd.service"
}

# What the service is doing once started, and what to fix when it is waiting.
report_status() {
    local status="" _
    # READY comes first; the status line follows as soon as the devices are tried.
    for _ in $(seq 20); do
        status=$(systemctl show -p StatusText --value speakerd.service)
        case $status in idle*|waiting*|listening*|muted*) break ;; esac
        sleep 0.5
    done
    case $status in
        "waiting for microphone"*|"waiting for speaker"*|"waiting for audio"*)
            say "speakerd is running, $status: it opens the device as soon as it appears."
            say "  No sound card yet? Plug it in (or enable the HAT's overlay and reboot)."
            say "  Another name? 'arecord -L' and 'aplay -L' list them; set" \
                "capture_device / playback_device in /etc/speakerd/speakerd.toml, then:" \
                "sudo systemctl restart speakerd"
            ;;
        *)
            say "speakerd is running (${status:-no status yet}); follow it with:" \
                "journalctl -u speakerd -f"
            ;;
    esac
}

# The unit did not start: say why in speakerd's words, not only systemd's.
report_failure() {
    local code
    code=$(systemctl show -p ExecMainStatus --value speakerd.service)
    echo "install.sh: speakerd did not start (exit status ${code:-?}); its last lines:" >&2
    journalctl -u speakerd.service -n 8 --no-pager -o cat >&2 || true
    case $code in
        78) echo "install.sh: fix the config line above (check it with:" \
                 "sudo speakerd config --check), then: sudo systemctl restart speakerd" >&2 ;;
        *) echo "install.sh: more in: journalctl -u speakerd -b" >&2 ;;
    esac
}

start_service() {
    if [ -n "$root" ] || [ "$start" -eq 0 ]; then
        return 0
    fi
    systemctl daemon-reload
    systemctl enable --quiet speakerd.service
    # restart, not start: a re-install must run the new code. systemd's own
    # "Job for speakerd.service failed" line says nothing useful; report_failure does.
    if ! systemctl restart speakerd.service 2>/dev/null; then
        report_failure
        exit 1
    fi
    report_status
}

uninstall() {
    if [ -z "$root" ]; then
        systemctl disable --now speakerd.service 2>/dev/null || true
    fi
    rm -f "$unit_dir/speakerd.service"
    rm -rf "$prefix"
    if [ "$(readlink "$root/usr/local/bin/speakerd" 2>/dev/null)" = /opt/speakerd/venv/bin/speakerd ]; then
        rm -f "$root/usr/local/bin/speakerd"
    fi
    if [ "$purge" -eq 1 ]; then
        rm -rf "$etc"
        if has_users && [ -n "$(awk -F: '$1 == "speakerd"' "$root/etc/passwd")" ]; then
            # shellcheck disable=SC2046
            userdel $(root_args) speakerd
        fi
        say "removed speakerd, its config, key and user"
    else
        say "removed speakerd; kept /etc/speakerd (--purge removes it)"
    fi
    # Without a running systemd (a chroot building an image) there is nothing to reload.
    if [ -z "$root" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload
    fi
}

if [ "$uninstall" -eq 1 ]; then
    uninstall
    exit 0
fi
install_packages
create_user
install_venv
install_config
install_unit
start_service
say "done"
