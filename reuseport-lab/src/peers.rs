//! Peers in the same run, so results are not only self-referential: Debian's nginx as a row
//! (`reuseport`, one worker per CPU, `worker_cpu_affinity auto`), and `wrk` as a second load
//! generator to cross-check the built-in one.

use std::{
    fs,
    net::SocketAddr,
    path::Path,
    process::{Command, Stdio},
    sync::atomic::AtomicBool,
    thread,
    time::{Duration, Instant},
};

use reuseport::cpus::CpuList;

use crate::{child::ChildGuard, error::RunnerError, load::LoadKind, topology::Topology};

/// Starts nginx on the server side, serving `200 ok` on a free port with `reuseport`; returns
/// once every worker is up.
pub(crate) fn start_nginx(
    topology: &Topology,
    cpus: &CpuList,
    dir: &Path,
    connections: usize,
) -> Result<(ChildGuard, SocketAddr), RunnerError> {
    let port = free_port()?;
    let addr = SocketAddr::new(topology.server_ip(), port);
    let dir = dir.canonicalize().map_err(|source| RunnerError::File {
        path: dir.to_path_buf(),
        source,
    })?;
    let d = dir.display();
    let workers = cpus.len();
    let conf = format!(
        "daemon off;\nmaster_process on;\nuser root;\nworker_processes {workers};\n\
         worker_cpu_affinity auto;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{ worker_connections {}; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         \x20 fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n    listen {addr} reuseport backlog=1024;\n    location / {{ return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        (connections * 4).max(1024)
    );
    let conf_path = dir.join("nginx.conf");
    fs::write(&conf_path, conf).map_err(|source| RunnerError::File {
        path: conf_path.clone(),
        source,
    })?;
    let mut command = Command::new("nginx");
    command
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    topology.server_side(&mut command)?;
    crate::cpu_split::confine_on_spawn(&mut command, cpus);
    let mut guard = ChildGuard::spawn(command, "nginx (apt-get install nginx)")?;
    // Ready when all workers exist (the master binds the reuseport sockets before forking them).
    let deadline = Instant::now() + Duration::from_secs(10);
    while reuseport::procfs::children_of(guard.pid()).len() < workers {
        if Instant::now() > deadline || matches!(guard.child_mut().try_wait(), Ok(Some(_))) {
            let stderr = guard.kill_and_read_stderr();
            let log = fs::read_to_string(dir.join("error.log")).unwrap_or_default();
            return Err(RunnerError::Child {
                what: "nginx".into(),
                detail: format!("did not start: {} {}", stderr.trim(), log.trim()),
            });
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok((guard, addr))
}

/// Runs wrk on the client side against `addr` and returns its requests per second.
pub(crate) fn run_wrk(
    topology: &Topology,
    addr: SocketAddr,
    kind: LoadKind,
    cpus: &CpuList,
    connections: usize,
    duration: Duration,
    stop: &AtomicBool,
) -> Result<f64, RunnerError> {
    if kind == LoadKind::Udp {
        return Err(RunnerError::Invalid(
            "wrk speaks HTTP: no cross-check for udp".into(),
        ));
    }
    let dir = std::env::temp_dir().join(format!("reuseport-wrk-{}", std::process::id()));
    fs::create_dir_all(&dir).map_err(|source| RunnerError::File {
        path: dir.clone(),
        source,
    })?;
    let output = dir.join("wrk.txt");
    let file = fs::File::create(&output).map_err(|source| RunnerError::File {
        path: output.clone(),
        source,
    })?;
    let mut command = Command::new("wrk");
    command
        .arg(format!("-t{}", cpus.len().min(connections).max(1)))
        .arg(format!("-c{connections}"))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(Stdio::piped());
    if kind == LoadKind::Crr {
        // A new connection per request, like the built-in crr load.
        command.args(["-H", "Connection: close"]);
    }
    command.arg(format!("http://{addr}/"));
    topology.client_side(&mut command)?;
    crate::cpu_split::confine_on_spawn(&mut command, cpus);
    let mut wrk = ChildGuard::spawn(command, "wrk (apt-get install wrk)")?;
    wrk.wait(duration + Duration::from_secs(30), stop)?;
    let text = fs::read_to_string(&output).map_err(|source| RunnerError::File {
        path: output.clone(),
        source,
    })?;
    let _ = fs::remove_dir_all(&dir);
    text.lines()
        .find_map(|line| line.trim().strip_prefix("Requests/sec:"))
        .and_then(|value| value.trim().parse().ok())
        .ok_or_else(|| RunnerError::Child {
            what: "wrk".into(),
            detail: format!("no Requests/sec in its output: {text}"),
        })
}

/// A port that is free in this namespace (and so, in practice, in the empty server namespace).
fn free_port() -> Result<u16, RunnerError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|source| RunnerError::File {
            path: "127.0.0.1:0".into(),
            source,
        })
}
