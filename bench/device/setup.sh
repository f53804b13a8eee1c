# Sourced by the device scripts: unpacks the carried binaries (dist/dejavu.xz,
# dist/dejavu-bench.xz, dist/dejavu-train.xz, and the baseline of an A/B call,
# dist/dejavu-bench-base.xz, whichever are there) once per machine into /tmp/bin, puts them
# on PATH, and points at the CUDA libraries.
mkdir -p /tmp/bin
for bin in dejavu dejavu-bench dejavu-bench-base dejavu-train; do
    if [ -f "dist/$bin.xz" ] && { [ ! -x "/tmp/bin/$bin" ] || [ "dist/$bin.xz" -nt "/tmp/bin/$bin" ]; }; then
        xz -dc "dist/$bin.xz" > "/tmp/bin/$bin" && chmod +x "/tmp/bin/$bin"
    fi
done
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
# Nsight Compute's command line, where the machine has one (ncu-step.sh, ncu-kernel.sh).
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1 || true)
