//! Running `nox-server` as a process in tests.

#![allow(dead_code)] // Each test binary uses a different part of this.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running `nox-server` whose stderr (the log) is collected line by line,
/// and whose stdout is collected whole.
pub struct Server {
    pub child: Child,
    lines: Receiver<String>,
    pub log: Vec<String>,
    stdout: Option<std::thread::JoinHandle<String>>,
    pub base: String,
    _default_data_dir: tempfile::TempDir,
}

impl Server {
    pub fn start(envs: &[(&str, &str)]) -> Server {
        Server::start_with(envs, |_| {})
    }

    /// [`Server::start`], with `adjust` applied to the command last (to run
    /// it as another user, say).
    pub fn start_with(envs: &[(&str, &str)], adjust: impl FnOnce(&mut Command)) -> Server {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nox-server"));
        let default_data_dir = tempfile::tempdir().expect("tempdir");
        command
            .env_remove("DATABASE_URL")
            // Never the default ./nox-data inside the source tree.
            .env("NOX_DATA_DIR", default_data_dir.path())
            .env("NOX_PORT", "0")
            .env("NOX_WORKERS", "1")
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in envs {
            command.env(key, value);
        }
        adjust(&mut command);
        let mut child = command.spawn().expect("spawn nox-server");
        let mut stdout = child.stdout.take().expect("stdout");
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut text);
            text
        });
        let stderr = child.stderr.take().expect("stderr");
        let (sender, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut server = Server {
            child,
            lines,
            log: Vec::new(),
            stdout: Some(stdout),
            base: String::new(),
            _default_data_dir: default_data_dir,
        };
        let line = server
            .wait_for_line("listening on http://", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("server did not start: {:#?}", server.log));
        let address = line
            .split("listening on http://")
            .nth(1)
            .expect("address")
            .split_whitespace()
            .next()
            .expect("address");
        server.base = format!("http://{address}");
        server
    }

    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(_) => return None,
            }
        }
        None
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal");
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                // Collect the rest of the log for assertions.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.log.push(line);
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "server did not exit: {:#?}",
                self.log
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Server {
    /// [`Server::start`] from an async test: the start blocks until the
    /// server listens, so it runs on a blocking thread.
    pub async fn start_async(envs: Vec<(&'static str, String)>) -> Server {
        tokio::task::spawn_blocking(move || {
            let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            Server::start(&envs)
        })
        .await
        .expect("the server start task")
    }

    /// Everything the server printed on stdout; call after it exited.
    pub fn take_stdout(&mut self) -> String {
        self.stdout
            .take()
            .map(|reader| reader.join().expect("stdout reader"))
            .unwrap_or_default()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn get(url: &str) -> (u16, serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let response = reqwest::get(url).await.expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    })
}

pub fn post_json(url: &str, token: &str, body: serde_json::Value) -> serde_json::Value {
    let (status, body) = post_json_status(url, token, body);
    assert!((200..300).contains(&status), "{status}: {body}");
    body
}

/// POST with a JSON body and a token: the status and the JSON answer.
pub fn post_json_status(
    url: &str,
    token: &str,
    body: serde_json::Value,
) -> (u16, serde_json::Value) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let response = reqwest::Client::new()
            .post(url)
            .bearer_auth(token)
            .json(&body)
            .send()
            .await
            .expect("request");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    })
}
