#!/bin/bash
# Entrypoint wrapper for the Ascend image: load the CANN environment that the vendor's set_env.sh scripts
# define (toolkit, then NNAL/ATB where present), then run the command ("glm-serve serve ..."). An exec-form
# ENTRYPOINT runs no shell, so nothing else would source them.
for env_script in \
    /usr/local/Ascend/ascend-toolkit/set_env.sh \
    /usr/local/Ascend/nnal/atb/set_env.sh; do
    if [ -f "$env_script" ]; then
        # shellcheck disable=SC1090
        . "$env_script"
    fi
done
exec "$@"
