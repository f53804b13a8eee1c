//! CPU time of this process's threads, by role, from Linux's `/proc`: the calling thread
//! (the model's, which runs our launchers and hands each launch over), CubeCL's
//! device-server threads (named `DS…`; they launch the kernels and reserve buffers), and
//! the rest. Where a decode step is bound by the host, the busier of the first two sets
//! its pace, and a change to either shows here as CPU time per step, without the noise of
//! wall-clock time on a shared machine.
//!
//! Per thread: `schedstat`'s first field (nanoseconds on the CPU) where the kernel keeps
//! scheduler statistics, else `stat`'s user + system time in clock ticks (10 ms). (sysinfo
//! reports threads only as a usage percentage between refreshes.)

use std::fs;

use serde::Serialize;

/// CPU time in µs, summed per role.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ThreadCpu {
    pub model_us: f64,
    pub device_server_us: f64,
    pub other_us: f64,
}

impl ThreadCpu {
    /// This process's threads now; `None` where `/proc` cannot be read (not Linux).
    pub fn now() -> Option<Self> {
        let me = fs::read_link("/proc/thread-self").ok()?;
        let me = me.file_name()?.to_str()?.to_string();
        let mut cpu = ThreadCpu::default();
        for task in fs::read_dir("/proc/self/task").ok()?.flatten() {
            let tid = task.file_name().to_string_lossy().to_string();
            let path = task.path();
            // A thread can end between the listing and the reads: skip it.
            let Some(us) = task_cpu_us(&path) else { continue };
            let name = fs::read_to_string(path.join("comm")).unwrap_or_default();
            if tid == me {
                cpu.model_us += us;
            } else if name.starts_with("DS") {
                cpu.device_server_us += us;
            } else {
                cpu.other_us += us;
            }
        }
        Some(cpu)
    }

    /// The mean of several measurements.
    pub fn mean(all: &[ThreadCpu]) -> ThreadCpu {
        let n = all.len().max(1) as f64;
        ThreadCpu {
            model_us: all.iter().map(|c| c.model_us).sum::<f64>() / n,
            device_server_us: all.iter().map(|c| c.device_server_us).sum::<f64>() / n,
            other_us: all.iter().map(|c| c.other_us).sum::<f64>() / n,
        }
    }

    /// What was spent since `earlier`, divided by `steps`.
    pub fn per_step_since(&self, earlier: &ThreadCpu, steps: usize) -> ThreadCpu {
        let n = steps.max(1) as f64;
        ThreadCpu {
            model_us: (self.model_us - earlier.model_us) / n,
            device_server_us: (self.device_server_us - earlier.device_server_us) / n,
            other_us: (self.other_us - earlier.other_us) / n,
        }
    }
}

fn task_cpu_us(path: &std::path::Path) -> Option<f64> {
    if let Ok(s) = fs::read_to_string(path.join("schedstat")) {
        if let Some(ns) = s.split_whitespace().next().and_then(|v| v.parse::<f64>().ok()).filter(|ns| *ns > 0.0) {
            return Some(ns / 1e3);
        }
    }
    // stat: the command name is in parentheses and may hold spaces; fields after it start
    // with the state (field 3), so utime and stime (14 and 15) are the 12th and 13th.
    let stat = fs::read_to_string(path.join("stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // /proc reports clock ticks in USER_HZ, 100 on Linux whatever the kernel's HZ.
    Some(ticks * 1e4)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_os = "linux")]
    fn a_busy_thread_shows_as_the_model_thread() {
        let before = ThreadCpu::now().expect("/proc/self/task readable on Linux");
        // ~50 ms of work on this thread.
        let start = std::time::Instant::now();
        let mut x = 0u64;
        while start.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let spent = ThreadCpu::now().unwrap().per_step_since(&before, 1);
        // Tick resolution is 10 ms; the thread ran about 50 ms.
        assert!(spent.model_us >= 20_000.0 && spent.model_us <= 200_000.0, "{spent:?}");
    }
}
