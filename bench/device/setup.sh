# Sourced by the device scripts: unpacks the carried dejavu-bench (dist/dejavu-bench.xz)
# once per machine into /tmp/bin, puts it on PATH, and points at the CUDA libraries.
mkdir -p /tmp/bin
if [ ! -x /tmp/bin/dejavu-bench ] || [ dist/dejavu-bench.xz -nt /tmp/bin/dejavu-bench ]; then
    xz -dc dist/dejavu-bench.xz > /tmp/bin/dejavu-bench && chmod +x /tmp/bin/dejavu-bench
fi
export PATH=/tmp/bin:$PATH PYTHONUNBUFFERED=1
export LD_LIBRARY_PATH=/usr/local/cuda/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
