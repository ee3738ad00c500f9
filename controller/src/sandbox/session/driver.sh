# DeltaBox bash session driver (see docs/sessions.md). Runs as `bash -c`.
# Request on fd 0: "<nonce>\n<code>\0". Reply: the code's own output, then
# "\036DBX<nonce> <status>\036" written to stdout and to stderr.
# Every driver command is a `builtin` so that user functions named like
# builtins (printf, read, trap…) cannot break the protocol.

# A SIGINT ignored when bash starts cannot be trapped, and then interrupts
# could not stop the code: refuse to start.
builtin trap ':' INT
if [[ "$(builtin trap -p INT)" != *"':'"* ]]; then
    builtin printf 'deltabox session: SIGINT is ignored in this process, so a timeout could not interrupt the code; start the session with SIGINT at its default\n' >&2
    builtin exit 97
fi
# Descriptors inherited from whoever started us would be in every
# checkpoint: only fds 0-2 may stay open.
for __dbx_fd in /proc/self/fd/*; do
    __dbx_fd=${__dbx_fd##*/}
    if [[ $__dbx_fd == [0-9]* ]] && (( __dbx_fd > 2 )); then
        builtin eval "exec $__dbx_fd>&-"
    fi
done
builtin unset __dbx_fd
# Between calls a late SIGINT (a timeout racing the end of the code) is dropped.
builtin trap '' INT

__dbx_nonce=
__dbx_last=0
__dbx_intr=
__dbx_xtrace=

# `exit` (or `set -e` failing) ends bash: say so in a marker with the status,
# so the daemon reports the exit instead of a broken pipe.
__dbx_on_exit() {
    __dbx_s=$?
    if [[ -n ${__dbx_nonce-} ]]; then
        builtin printf '\036DBX%s exit %d\036' "$__dbx_nonce" "$__dbx_s"
        builtin printf '\036DBX%s exit %d\036' "$__dbx_nonce" "$__dbx_s" >&2
    fi
}
builtin trap '__dbx_on_exit' EXIT

__dbx_set_status() { builtin return "${1-0}"; }

# Runs the code in this shell (so variables, functions, cd, export persist).
# SIGINT makes every shell function on the stack return: the INT trap turns
# on a DEBUG trap that, with extdebug, simulates `return` in each function
# frame, down to and including this one; the main loop then turns it off.
__dbx_run() {
    { builtin trap '__dbx_intr=1; builtin set -T; builtin shopt -s extdebug; builtin trap "if [[ -n \${FUNCNAME[0]-} ]]; then builtin return 2; fi" DEBUG' INT; } 2>/dev/null
    if [[ -n $__dbx_xtrace ]]; then
        # Tracing starts inside the code, so the driver's lines are not traced
        # (at the price of `$?` not carrying over from the previous call).
        builtin eval "builtin set -x; $1"
    else
        __dbx_set_status "$__dbx_last"
        builtin eval "$1"
    fi
}

builtin shopt -s expand_aliases
builtin printf '\036DBX-ready\036'
builtin printf '\036DBX-ready\036' >&2

while :; do
    __dbx_req=
    __dbx_nonce=
    if ! IFS= builtin read -r -d '' __dbx_req; then
        # End of input (the daemon closed the pipe): leave quietly.
        __dbx_nonce=
        builtin exit 0
    fi
    __dbx_nonce=${__dbx_req%%$'\n'*}
    __dbx_intr=
    # The code's stdin is /dev/null: fd 0 is the request pipe and must not be
    # consumed by the code or its children.
    __dbx_run "${__dbx_req#*$'\n'}" </dev/null
    {
        __dbx_last=$?
        builtin trap '' INT
        builtin trap - DEBUG
        builtin set +T
        builtin shopt -u extdebug
        # `set -x` in the code must not trace the driver: off until the next call.
        __dbx_xtrace=
        if [[ $- == *x* ]]; then __dbx_xtrace=1; builtin set +x; fi
        if [[ -n $__dbx_intr ]]; then __dbx_last=130; fi
    } 2>/dev/null
    # The reply comes last, stdout's marker after stderr's and with no
    # redirection around it: once the daemon has both, bash holds no fd but
    # 0-2 (bash keeps copies of redirected fds until a command ends).
    builtin printf '\036DBX%s %d\036' "$__dbx_nonce" "$__dbx_last" >&2
    builtin printf '\036DBX%s %d\036' "$__dbx_nonce" "$__dbx_last"
done
