//! A headless Chromium driven over WebDriver: each test starts its own
//! `chromedriver` (and through it a browser with a fresh profile and
//! download directory), runs one at a time, and saves a screenshot when it
//! fails.

use std::future::Future;
use std::net::TcpListener;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use futures_util::FutureExt;
use hyper_util::client::legacy::connect::HttpConnector;
use nox_testkit::TestApp;
use serde_json::{Value, json};

/// How long a test waits for the page to show something before failing.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// One browser at a time: two cores do not run several Chromiums and the
/// server under test without making the tests' deadlines flaky.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The WebDriver server and the browser, from the environment or Debian's
/// packages (`chromium`, `chromium-driver`).
fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let driver = std::env::var_os("NOX_CHROMEDRIVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromedriver"));
    let browser = std::env::var_os("NOX_CHROMIUM")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    for path in [&driver, &browser] {
        if !path.is_file() {
            return Err(format!(
                "{} is missing (apt-get install chromium chromium-driver)",
                path.display()
            ));
        }
    }
    Ok((driver, browser))
}

/// A running `chromedriver`, killed when dropped.
struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_driver(path: &Path) -> Driver {
    let port = TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let child = Command::new(path)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("starting {}: {error}", path.display()));
    let driver = Driver {
        child,
        url: format!("http://127.0.0.1:{port}"),
    };
    let status = format!("{}/status", driver.url);
    let deadline = Instant::now() + PATIENCE;
    loop {
        if let Ok(response) = reqwest::get(&status).await
            && response.status().is_success()
        {
            return driver;
        }
        assert!(Instant::now() < deadline, "chromedriver did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A browser session on the console of one test app.
pub struct Session {
    pub client: Client,
    /// Where the browser saves downloads.
    pub downloads: tempfile::TempDir,
    console: String,
    _profile: tempfile::TempDir,
}

/// Where a failing test's screenshot goes: `<target dir>/browser-screenshots`.
fn screenshot_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.parent()?.to_path_buf()))
        .unwrap_or_else(std::env::temp_dir)
        .join("browser-screenshots")
}

/// Runs `test` in a fresh browser on `app`'s console. Without Chromium and
/// its driver the test is skipped, saying why, unless `NOX_REQUIRE_BROWSER=1`
/// (CI), which makes it fail. A failing test leaves a screenshot of the
/// page in `target/browser-screenshots/<name>.png`.
pub async fn run(name: &str, app: &TestApp, test: impl AsyncFnOnce(&Session)) {
    let (driver_path, browser_path) = match binaries() {
        Ok(found) => found,
        Err(why) => {
            if std::env::var("NOX_REQUIRE_BROWSER").as_deref() == Ok("1") {
                panic!("{name}: {why}, and NOX_REQUIRE_BROWSER=1");
            }
            eprintln!("skipped {name}: {why}");
            return;
        }
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let driver = start_driver(&driver_path).await;
    let profile = tempfile::tempdir().expect("a profile directory");
    let downloads = tempfile::tempdir().expect("a download directory");
    let capabilities = json!({
        "browserName": "chrome",
        "unhandledPromptBehavior": "ignore",
        "goog:chromeOptions": {
            "binary": browser_path,
            "args": [
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-extensions",
                "--disable-dev-shm-usage",
                format!("--user-data-dir={}", profile.path().display()),
                "--window-size=1280,800",
            ],
            "prefs": {
                "download.default_directory": downloads.path(),
                "download.prompt_for_download": false,
                "download.directory_upgrade": true,
                "safebrowsing.enabled": false,
                "profile.default_content_setting_values.automatic_downloads": 1,
            },
        },
    });
    let Value::Object(capabilities) = capabilities else {
        unreachable!()
    };
    let client = ClientBuilder::new(HttpConnector::new())
        .capabilities(capabilities)
        .connect(&driver.url)
        .await
        .unwrap_or_else(|error| panic!("{name}: no browser session: {error}"));
    let session = Session {
        client: client.clone(),
        downloads,
        console: app.url("/console"),
        _profile: profile,
    };
    let outcome = AssertUnwindSafe(test(&session)).catch_unwind().await;
    if outcome.is_err() {
        save_screenshot(&client, name).await;
    }
    let _ = client.close().await;
    drop(driver);
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn save_screenshot(client: &Client, name: &str) {
    let dir = screenshot_dir();
    let path = dir.join(format!("{name}.png"));
    match client.screenshot().await {
        Ok(png) => match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, png)) {
            Ok(()) => eprintln!("{name} failed: screenshot in {}", path.display()),
            Err(error) => eprintln!("{name} failed: {}: {error}", path.display()),
        },
        Err(error) => eprintln!("{name} failed, and no screenshot: {error}"),
    }
}

/// Polls `probe` until it returns `Some`, or fails the test after
/// [`PATIENCE`] naming `what` and the last thing seen.
pub async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        let last = match probe().await {
            Ok(found) => return found,
            Err(last) => last,
        };
        if Instant::now() > deadline {
            panic!("gave up waiting for {what}; last: {last}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Session {
    /// Opens the console.
    pub async fn open(&self) {
        self.client
            .goto(&self.console)
            .await
            .expect("open /console");
    }

    /// Signs in with `token` and waits for the records to show.
    pub async fn sign_in(&self, token: &str) {
        self.open().await;
        self.type_into("#token", token).await;
        self.click("#signin-submit").await;
        wait_for("the console after signing in", || async {
            match self.displayed("#app").await {
                true => Ok(()),
                false => Err(self.text("#signin-error").await),
            }
        })
        .await;
    }

    pub async fn find(&self, css: &str) -> Element {
        self.client
            .wait()
            .at_most(PATIENCE)
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|error| panic!("{css}: {error}"))
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|error| panic!("click {css}: {error}"));
    }

    /// Replaces the value of the input `css` with `text`, as typed.
    pub async fn type_into(&self, css: &str, text: &str) {
        let input = self.find(css).await;
        input.clear().await.expect("clear");
        input
            .send_keys(text)
            .await
            .unwrap_or_else(|error| panic!("type into {css}: {error}"));
    }

    pub async fn select(&self, css: &str, value: &str) {
        self.find(css)
            .await
            .select_by_value(value)
            .await
            .unwrap_or_else(|error| panic!("select {value} in {css}: {error}"));
    }

    /// Runs `script` (a function body) in the page with `args`.
    pub async fn js(&self, script: &str, args: Vec<Value>) -> Value {
        self.client
            .execute(script, args)
            .await
            .unwrap_or_else(|error| panic!("script failed: {error}\n{script}"))
    }

    /// The text content of the first element matching `css` ("" if none).
    pub async fn text(&self, css: &str) -> String {
        let value = self
            .js(
                "const e = document.querySelector(arguments[0]); return e ? e.textContent : '';",
                vec![json!(css)],
            )
            .await;
        value.as_str().unwrap_or_default().to_owned()
    }

    /// The text content of every element matching `css`.
    pub async fn texts(&self, css: &str) -> Vec<String> {
        let value = self
            .js(
                "return Array.from(document.querySelectorAll(arguments[0]), e => e.textContent);",
                vec![json!(css)],
            )
            .await;
        serde_json::from_value(value).expect("strings")
    }

    /// An attribute of every element matching `css`.
    pub async fn attributes(&self, css: &str, name: &str) -> Vec<String> {
        let value = self
            .js(
                "return Array.from(document.querySelectorAll(arguments[0]), e => e.getAttribute(arguments[1]) || '');",
                vec![json!(css), json!(name)],
            )
            .await;
        serde_json::from_value(value).expect("strings")
    }

    /// Whether the first element matching `css` is shown.
    pub async fn displayed(&self, css: &str) -> bool {
        let value = self
            .js(
                "const e = document.querySelector(arguments[0]); return !!e && e.checkVisibility();",
                vec![json!(css)],
            )
            .await;
        value.as_bool().unwrap_or(false)
    }

    /// Waits until `css` is shown (`shown`) or hidden.
    pub async fn wait_shown(&self, css: &str, shown: bool) {
        let what = format!("{css} {}", if shown { "shown" } else { "hidden" });
        wait_for(&what, || async {
            match self.displayed(css).await == shown {
                true => Ok(()),
                false => Err(format!("still {}", if shown { "hidden" } else { "shown" })),
            }
        })
        .await;
    }

    /// Goes to a view through its link in the navigation.
    pub async fn view(&self, name: &str) {
        self.click(&format!("nav.views a[data-view='{name}']"))
            .await;
        let section = format!("#view-{name}");
        wait_for(&format!("the {name} view"), || async {
            match self.displayed(&section).await {
                true => Ok(()),
                false => Err("hidden".to_owned()),
            }
        })
        .await;
    }

    /// Sets the search filters (name → value; every other filter empty)
    /// and applies them.
    pub async fn filter(&self, filters: &[(&str, &str)]) {
        self.click("#clear-filters").await;
        for (name, value) in filters {
            let css = format!("#f-{name}");
            let tag = self.find(&css).await.tag_name().await.expect("tag");
            if tag == "select" {
                self.select(&css, value).await;
            } else {
                self.type_into(&css, value).await;
            }
        }
        self.click("#apply-filters").await;
    }

    /// Waits until the search has finished loading and returns the ids of
    /// its rows.
    pub async fn search_rows(&self) -> Vec<String> {
        wait_for("the search to finish", || async {
            let status = self.text("#search-status").await;
            match status.starts_with("Loading") || status.is_empty() {
                true => Err(status),
                false => Ok(()),
            }
        })
        .await;
        self.attributes("#records tbody tr", "data-id").await
    }

    /// Files in the download directory, complete ones only.
    pub fn downloaded(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(self.downloads.path())
            .expect("the download directory")
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                !name.ends_with(".crdownload") && !name.starts_with('.')
            })
            .collect();
        files.sort();
        files
    }

    /// Waits for a downloaded file whose name starts with `prefix`.
    pub async fn download(&self, prefix: &str) -> PathBuf {
        wait_for(&format!("a download named {prefix}*"), || async {
            let files = self.downloaded();
            files
                .iter()
                .find(|path| {
                    path.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(prefix))
                })
                .cloned()
                .ok_or_else(|| format!("{files:?}"))
        })
        .await
    }
}
