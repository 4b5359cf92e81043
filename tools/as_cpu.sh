#!/usr/bin/env bash
# Runs a command as on a CPU with less than this one: the CPU families tokenmill meets whose code paths this machine
# would otherwise never take (`make test` on the Zen 4 never runs the AVX2 int8 tiles or the fp32 default of a CPU
# without native bf16). Inside, every layer that picks a code path by the CPU sees the smaller one:
#   /proc/cpuinfo's flags (tokenmill's capabilities, the execution plan's key, torch inductor's vector ISA): the
#     profile's extensions removed, through a bind mount in a mount namespace of the command's own;
#   the C kernels: built with the profile's -march (TOKENMILL_KERNEL_CFLAGS), so no intrinsic beyond it is compiled;
#   torch: ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA cap its own kernels and oneDNN's;
#   caches (kernels, plans, inductor's compiled graphs) under their own directory per profile: code built for one
#     profile is never loaded under another (inductor's cache key does not hold ATen's capability: a shared cache
#     gave --compile wrong outputs).
# The code still runs on this CPU, so only correctness is what it was on the profile's machine, not timings.
#
#   tools/as_cpu.sh avx2 .venv/bin/python -m pytest -q tests          # AVX2 + FMA, no AVX-512 (the Zen 3)
#   tools/as_cpu.sh avx512-vnni .venv/bin/python -m pytest -q tests   # AVX-512 + VNNI, no BF16/AMX (Ice Lake Xeon)
#
# Needs root (or unprivileged user namespaces: unshare -rm) and a CPU with every extension the profile keeps.
set -euo pipefail

usage() { echo "usage: $0 avx2|avx512-vnni COMMAND [ARG...]" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
profile=$1
shift

host_flags=$(grep -m1 '^flags' /proc/cpuinfo || true)
case $profile in
  avx2)
    needs=(avx2 fma f16c)
    drop='avx512[a-z0-9_]*|avx_vnni|amx_[a-z0-9]*'
    march=x86-64-v3 aten=avx2 onednn=AVX2 ;;
  avx512-vnni)
    needs=(avx512f avx512bw avx512vl avx512_vnni)
    drop='avx512_bf16|avx512_fp16|amx_[a-z0-9]*'
    march=icelake-server aten=avx512 onednn=AVX512_CORE_VNNI ;;
  *) usage ;;
esac
for flag in "${needs[@]}"; do
  [[ " $host_flags " == *" $flag "* ]] || { echo "$0: this CPU lacks $flag, which profile $profile keeps" >&2; exit 1; }
done

base=${XDG_CACHE_HOME:-$HOME/.cache}
cache=$base/tokenmill-as-cpu/$profile
mkdir -p "$cache"
cpuinfo=$cache/cpuinfo
sed -E "/^flags/s/ ($drop)\b//g" /proc/cpuinfo > "$cpuinfo"

export TM_AS_CPU_INFO=$cpuinfo
export XDG_CACHE_HOME=$cache TORCHINDUCTOR_CACHE_DIR=$cache/inductor
export HF_HOME=${HF_HOME:-$base/huggingface}  # the models already downloaded stay where they are
export TOKENMILL_KERNEL_CFLAGS="-march=$march ${TOKENMILL_KERNEL_CFLAGS:-}"
export ATEN_CPU_CAPABILITY=$aten ONEDNN_MAX_CPU_ISA=$onednn

ns=(unshare -m)
[[ $(id -u) -eq 0 ]] || ns=(unshare -rm)
exec "${ns[@]}" bash -c 'mount --bind "$TM_AS_CPU_INFO" /proc/cpuinfo && exec "$@"' bash "$@"
