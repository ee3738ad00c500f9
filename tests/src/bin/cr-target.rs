//! A tiny single-threaded process for the DeltaCR tests, driven line by line on stdin.
//!
//! - `cr-target serve [--alloc MIB] [--thp] [--seccomp]`: a command loop (see
//!   [`serve`]) over a counter in memory, an optional touched allocation, and files it
//!   opens; `--seccomp` first installs a filter that kills it on `clone3`.
//! - `cr-target ticker MS`: prints `addr=<counter address>`, then increments the counter
//!   and prints `tick=<n>` every MS milliseconds (relative `nanosleep`).
//! - `cr-target sleep MS`: prints `start`, sleeps MS milliseconds in one relative
//!   `nanosleep`, prints `woke elapsed_ms=<since start>` (or the error).
//! - `cr-target threads`: starts a second thread, prints `ready`, waits.
//! - `cr-target pipe`: opens a pipe (fds 3 and 4), prints `ready`, waits.
//! - `cr-target shm`: maps a page of shared anonymous memory, prints `ready`, waits.

use std::arch::asm;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The counter the tests watch, at an address they read from other processes.
static COUNTER: AtomicU64 = AtomicU64::new(0);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    match arg(0) {
        "serve" => serve(&args[1..]),
        "ticker" => ticker(arg(1).parse().expect("ticker MS")),
        "sleep" => sleep(arg(1).parse().expect("sleep MS")),
        "threads" => {
            std::thread::spawn(std::thread::park);
            println!("ready");
            wait_forever();
        }
        "pipe" => {
            let mut fds = [0; 2];
            // SAFETY: `fds` is a valid array of two c_ints for pipe(2) to fill.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            println!("ready");
            wait_forever();
        }
        "socket" => {
            // A connected pair of Unix sockets, kept open (fds 3 and 4).
            let pair = std::os::unix::net::UnixStream::pair().expect("socketpair");
            std::mem::forget(pair);
            println!("ready");
            wait_forever();
        }
        "shm" => {
            // SAFETY: a fresh shared anonymous mapping, never dereferenced.
            let ptr = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(ptr, libc::MAP_FAILED);
            println!("ready");
            wait_forever();
        }
        other => panic!("unknown mode {other:?}"),
    }
}

fn wait_forever() -> ! {
    loop {
        std::thread::park();
    }
}

fn nanosleep(ms: u64) -> Result<(), i32> {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec; a null remainder pointer is allowed.
    let ret = unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
    if ret == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

fn ticker(ms: u64) {
    println!("addr={:#x}", COUNTER.as_ptr() as usize);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) + 1;
        println!("tick={n}");
        let _ = nanosleep(ms);
    }
}

fn sleep(ms: u64) {
    let start = Instant::now();
    println!("start");
    match nanosleep(ms) {
        Ok(()) => println!("woke elapsed_ms={}", start.elapsed().as_millis()),
        Err(libc::EINTR) => println!("eintr"),
        Err(errno) => println!("error {errno}"),
    }
}

/// Loads a pattern into xmm15, reads stdin with a raw `read` syscall, and returns what
/// xmm15 holds afterwards with the syscall's result: the vector registers and the
/// restart of a raw syscall, seen from inside.
fn xmm_read(buf: &mut [u8]) -> (u64, i64) {
    let out: u64;
    let ret: i64;
    // SAFETY: a read(0, buf, len) syscall into a live, writable buffer; xmm15, rcx and
    // r11 (which the syscall instruction clobbers) are declared as clobbered.
    unsafe {
        asm!(
            "movq xmm15, {pattern}",
            "syscall",
            "movq {out}, xmm15",
            pattern = in(reg) 0x1122_3344_5566_7788u64,
            out = lateout(reg) out,
            inlateout("rax") libc::SYS_read => ret,
            in("rdi") 0,
            in("rsi") buf.as_mut_ptr(),
            in("rdx") buf.len(),
            out("rcx") _,
            out("r11") _,
            out("xmm15") _,
            options(nostack),
        );
    }
    (out, ret)
}

/// The command loop. Each command answers one line:
/// `inc` → `n=<n>`; `get` → `n=<n>`; `addr` → `addr=<hex>`; `pid` → `pid=<> ppid=<>`;
/// `open PATH` → `fd=<fd>`; `close FD` (one it opened) → `ok`; `read` (the file
/// opened last) → `data=<4 bytes>`; `xmm` → (after one raw read of
/// stdin) `xmm=<hex> ret=<n>`; `sum` → `sum=<checksum of the allocation>`;
/// `write B` → every page of the allocation starts with byte B, `ok`; `cwd` →
/// `cwd=<path>`; `umask` → `umask=<octal>`; `block` → SIGUSR1 blocked, `ok`;
/// `pending` → `usr1_pending=<0|1>`; `exit`.
fn serve(opts: &[String]) {
    let mib: usize = opts
        .iter()
        .position(|a| a == "--alloc")
        .and_then(|i| opts.get(i + 1))
        .map_or(0, |v| v.parse().expect("--alloc MIB"));
    let thp = opts.iter().any(|a| a == "--thp");
    if opts.iter().any(|a| a == "--seccomp") {
        kill_on_clone3();
    }
    let alloc = allocate(mib << 20, thp);
    let mut files: Vec<File> = Vec::new();
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let mut line = String::new();
    loop {
        line.clear();
        if stdin.lock().read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut words = line.split_whitespace();
        let reply = match (words.next().unwrap_or(""), words.next()) {
            ("inc", _) => format!("n={}", COUNTER.fetch_add(1, Ordering::SeqCst) + 1),
            ("get", _) => format!("n={}", COUNTER.load(Ordering::SeqCst)),
            ("addr", _) => format!("addr={:#x}", COUNTER.as_ptr() as usize),
            // SAFETY: getpid and getppid cannot fail and touch no memory.
            ("pid", _) => format!("pid={} ppid={}", unsafe { libc::getpid() }, unsafe {
                libc::getppid()
            }),
            ("open", Some(path)) => match File::open(path) {
                Ok(f) => {
                    let fd = f.as_raw_fd();
                    files.push(f);
                    format!("fd={fd}")
                }
                Err(e) => format!("error {e}"),
            },
            ("close", Some(fd)) => {
                let fd: i32 = fd.parse().unwrap_or(-1);
                match files.iter().position(|f| f.as_raw_fd() == fd) {
                    Some(i) => {
                        files.remove(i);
                        "ok".to_owned()
                    }
                    None => format!("error fd {fd} is not open"),
                }
            }
            ("read", _) => {
                let mut buf = [0u8; 4];
                match files.last_mut().map(|f| f.read(&mut buf)) {
                    Some(Ok(n)) => format!("data={}", String::from_utf8_lossy(&buf[..n])),
                    Some(Err(e)) => format!("error {e}"),
                    None => "error no file".to_owned(),
                }
            }
            ("xmm", _) => {
                let mut buf = [0u8; 64];
                let (xmm, ret) = xmm_read(&mut buf);
                format!("xmm={xmm:x} ret={ret}")
            }
            ("sum", _) => format!("sum={}", checksum(alloc)),
            ("write", Some(b)) => {
                let b: u8 = b.parse().unwrap_or(0);
                for page in alloc.chunks_mut(4096) {
                    page[0] = b;
                }
                "ok".to_owned()
            }
            ("cwd", _) => format!("cwd={}", std::env::current_dir().unwrap().display()),
            ("umask", _) => {
                // SAFETY: umask cannot fail; the old mask is put back at once.
                let old = unsafe { libc::umask(0o022) };
                // SAFETY: as above.
                unsafe { libc::umask(old) };
                format!("umask={old:o}")
            }
            ("block", _) => {
                // SAFETY: a sigset_t on the stack, initialised by sigemptyset before use;
                // sigprocmask only changes this (single) thread's mask.
                unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigemptyset(&mut set);
                    libc::sigaddset(&mut set, libc::SIGUSR1);
                    libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                }
                "ok".to_owned()
            }
            ("pending", _) => {
                // SAFETY: a sigset_t on the stack for sigpending to fill.
                let usr1 = unsafe {
                    let mut set: libc::sigset_t = std::mem::zeroed();
                    libc::sigpending(&mut set);
                    libc::sigismember(&set, libc::SIGUSR1)
                };
                format!("usr1_pending={usr1}")
            }
            ("exit", _) => return,
            (other, _) => format!("error unknown command {other:?}"),
        };
        let _ = writeln!(out, "{reply}");
    }
}

/// Installs a seccomp filter that kills the process if it calls `clone3` (as DeltaCR's
/// injected fork does).
fn kill_on_clone3() {
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x05 | 0x10;
    const RET_K: u16 = 0x06;
    const ARCH_X86_64: u32 = 0xc000_003e;
    const KILL_PROCESS: u32 = 0x8000_0000;
    const ALLOW: u32 = 0x7fff_0000;
    let stmt = |code, k| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k, jt, jf| libc::sock_filter {
        code: JEQ_K,
        jt,
        jf,
        k,
    };
    let filter = [
        stmt(LD_W_ABS, 4), // seccomp_data.arch
        jeq(ARCH_X86_64, 1, 0),
        stmt(RET_K, KILL_PROCESS),
        stmt(LD_W_ABS, 0), // seccomp_data.nr
        jeq(libc::SYS_clone3 as u32, 0, 1),
        stmt(RET_K, KILL_PROCESS),
        stmt(RET_K, ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` points to `filter`, both alive for the calls; the kernel copies the
    // program.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog
            ),
            0
        );
    }
}

/// `len` bytes of anonymous memory, every page written (with `MADV_HUGEPAGE` first
/// when `thp`).
fn allocate(len: usize, thp: bool) -> &'static mut [u8] {
    if len == 0 {
        return &mut [];
    }
    // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED, "mmap {len} bytes");
    if thp {
        // SAFETY: advice on the mapping just created.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
    }
    // SAFETY: the mapping is `len` bytes, readable and writable, and lives until exit.
    let mem = unsafe { std::slice::from_raw_parts_mut(ptr.cast::<u8>(), len) };
    for (i, page) in mem.chunks_mut(4096).enumerate() {
        page[0] = (i % 251) as u8;
    }
    mem
}

fn checksum(mem: &[u8]) -> u64 {
    mem.chunks(4096).enumerate().fold(0u64, |acc, (i, page)| {
        acc.wrapping_mul(31)
            .wrapping_add(u64::from(page[0]) ^ i as u64)
    })
}
