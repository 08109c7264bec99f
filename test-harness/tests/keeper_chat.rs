//! `rbee-keeper chat` against a real local cluster it starts itself, on generated models and
//! SmolLM2: lines piped in as turns (the conversation carried from turn to turn, a failed turn
//! that does not end the chat, `/clear`, `/exit`, a lost queen), and a person's terminal under tmux (a
//! streamed answer, Ctrl-C during an answer, `/exit`, Ctrl-C at the prompt).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use test_harness::{KeeperEnv, send_signal, slow_model, smollm2, tiny_model};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const STEP: Duration = Duration::from_secs(180);

fn keeper_env() -> KeeperEnv {
    KeeperEnv::new(&[("RBEE_HEARTBEAT_INTERVAL", "100ms")])
}

/// One answered turn of a `--json` chat: its text and its `done` event's usage.
#[derive(Debug)]
struct Turn {
    text: String,
    prompt_tokens: u64,
}

/// The answered turns of a `--json` chat's stdout (one event per line).
fn answered(stdout: &str) -> Vec<Turn> {
    let mut turns = Vec::new();
    let mut text = String::new();
    for line in stdout.lines() {
        let event: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not an event ({e}): {line}"));
        match event["event"].as_str() {
            Some("token") => text.push_str(event["text"].as_str().unwrap()),
            Some("done") => turns.push(Turn {
                text: std::mem::take(&mut text),
                prompt_tokens: event["usage"]["prompt_tokens"].as_u64().unwrap(),
            }),
            Some("error") => text.clear(),
            _ => {}
        }
    }
    turns
}

#[tokio::test(flavor = "multi_thread")]
async fn piped_lines_are_turns_of_one_conversation() {
    let env = keeper_env();
    let model = tiny_model();
    let model = model.to_str().unwrap();
    let chat = [
        "chat",
        "--model",
        model,
        "--system",
        "You are terse.",
        "--temperature",
        "0",
        "--max-tokens",
        "8",
        "--json",
    ];
    // More words than the model's 512 positions: the queen refuses that turn alone.
    let too_long = "word ".repeat(2000);
    let input =
        format!("Hello there\nHello there\n{too_long}\n/clear\nHello there\n/exit\nNever sent\n");
    let out = env.run_with_input(&chat, &input, STEP).await;
    assert_eq!(out.code, Some(0), "{out:?}\n{}", env.logs());
    let turns = answered(&out.stdout);
    assert_eq!(
        turns.len(),
        3,
        "three answered turns, none after /exit: {out:?}"
    );

    // The second turn says the same as the first, after it: the model got the first
    // exchange too, so its prompt is longer.
    assert!(
        turns[1].prompt_tokens > turns[0].prompt_tokens,
        "the second turn carried no history: {turns:?}"
    );
    // After /clear the conversation starts over: the same prompt, the same greedy answer.
    assert_eq!(turns[2].prompt_tokens, turns[0].prompt_tokens, "{turns:?}");
    assert_eq!(turns[2].text, turns[0].text, "{turns:?}");

    // The refused turn is one line on stderr, and the chat went on.
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("rbee-keeper: "))
        .collect();
    assert_eq!(errors.len(), 1, "{out:?}");
    assert!(errors[0].contains("context"), "{out:?}");

    // A single question with --chat is what the first turn was.
    let single = env
        .run(
            &[
                "infer",
                "--model",
                model,
                "--system",
                "You are terse.",
                "--temperature",
                "0",
                "--max-tokens",
                "8",
                "--json",
                "Hello there",
            ],
            STEP,
        )
        .await;
    assert_eq!(single.code, Some(0), "{single:?}");
    let single = answered(&single.stdout);
    assert_eq!(single[0].prompt_tokens, turns[0].prompt_tokens);
    assert_eq!(single[0].text, turns[0].text);
}

#[tokio::test(flavor = "multi_thread")]
async fn smollm2_remembers_what_an_earlier_turn_said() {
    let env = keeper_env();
    let model = smollm2();
    let model = model.to_str().unwrap();
    let sampling = ["--temperature", "0", "--max-tokens", "30", "--json"];
    let question = "Which word did I ask you to remember?";
    let mut chat = vec!["chat", "--model", model];
    chat.extend(sampling);
    let input = format!("Remember the word Paris.\n{question}\n");
    let out = env.run_with_input(&chat, &input, STEP).await;
    assert_eq!(out.code, Some(0), "{out:?}\n{}", env.logs());
    let turns = answered(&out.stdout);
    assert_eq!(turns.len(), 2, "{out:?}");
    assert!(
        turns[1].text.contains("Paris"),
        "the second answer does not know the first turn: {turns:?}"
    );

    // Asked alone, the model has nothing to remember.
    let mut infer = vec!["infer", "--chat", "--model", model];
    infer.extend(sampling);
    infer.push(question);
    let alone = env.run(&infer, STEP).await;
    assert_eq!(alone.code, Some(0), "{alone:?}");
    let alone = answered(&alone.stdout);
    assert!(!alone[0].text.contains("Paris"), "{alone:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_queen_ends_the_chat_with_one_line() {
    let env = keeper_env();
    let model = tiny_model();
    let mut child = env
        .command(&[
            "chat",
            "--model",
            model.to_str().unwrap(),
            "--max-tokens",
            "4",
            "--json",
        ])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn rbee-keeper chat");
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    stdin.write_all(b"Hello\n").await.unwrap();
    let answered = tokio::time::timeout(STEP, async {
        while let Some(line) = stdout.next_line().await.unwrap() {
            if line.contains(r#""event":"done""#) {
                return;
            }
        }
        panic!("the chat ended before answering");
    })
    .await;
    assert!(answered.is_ok(), "no answer\n{}", env.logs());

    let queen = env.pid_file("queen").expect("the queen the chat started");
    send_signal(queen, "KILL");
    stdin.write_all(b"Are you there?\n").await.unwrap();
    let out = tokio::time::timeout(STEP, child.wait_with_output())
        .await
        .expect("the chat ends")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with(&format!(
            "rbee-keeper: no queen answers at {}",
            env.queen_url
        )),
        "{stderr}"
    );
}

/// A tmux server of its own (its socket in the environment's directory), killed on drop.
struct Tmux {
    socket: PathBuf,
}

impl Tmux {
    fn run(&self, args: &[&str]) -> Output {
        let output = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run tmux");
        assert!(
            output.status.success(),
            "tmux {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }

    /// Everything the pane shows and has scrolled away.
    fn screen(&self) -> String {
        String::from_utf8_lossy(
            &self
                .run(&["capture-pane", "-p", "-S", "-", "-t", "chat"])
                .stdout,
        )
        .into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", "chat"];
        args.extend_from_slice(keys);
        self.run(&args);
    }

    /// Waits until the screen satisfies `done`; panics with the screen and the logs.
    async fn until(&self, env: &KeeperEnv, what: &str, done: impl Fn(&str) -> bool) -> String {
        let started = Instant::now();
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(
                started.elapsed() < STEP,
                "{what}: not on the screen within {STEP:?}:\n{screen}\n{}",
                env.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .stderr(Stdio::null())
            .status();
    }
}

/// A tmux session 100 columns wide running `rbee-keeper chat` with `chat_args` in this
/// environment; the shell says how the keeper exited and keeps the pane open.
fn chat_in_tmux(env: &KeeperEnv, socket: &Path, chat_args: &[&str]) -> Tmux {
    let keeper = test_harness::bin_path("rbee-keeper");
    // The shell survives the Ctrl-C meant for the keeper (a trap, unlike an ignored signal,
    // is not inherited), so it can say how the keeper exited.
    let mut line = format!(
        "trap true INT; '{}' --queen-url {} chat",
        keeper.display(),
        env.queen_url
    );
    for arg in chat_args {
        line.push_str(&format!(" '{arg}'"));
    }
    line.push_str("; echo \"chat exited with $?\"; sleep 600");
    let mut command = Command::new("tmux");
    command
        .arg("-S")
        .arg(socket)
        .args([
            "new-session",
            "-d",
            "-s",
            "chat",
            "-x",
            "100",
            "-y",
            "30",
            &line,
        ])
        .env_remove("TMUX");
    env.isolate(&mut command);
    let status = command.status().expect("run tmux");
    assert!(status.success(), "tmux new-session failed");
    Tmux {
        socket: socket.to_owned(),
    }
}

fn tmux_missing() -> bool {
    let found = Command::new("tmux")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        assert_ne!(
            std::env::var("RBEE_REQUIRE_TMUX").as_deref(),
            Ok("1"),
            "tmux is not installed and RBEE_REQUIRE_TMUX=1"
        );
        eprintln!("skipped: tmux is not installed (apt-get install tmux)");
    }
    !found
}

/// The last line of the screen that is not blank.
fn last_line(screen: &str) -> &str {
    screen
        .lines()
        .rev()
        .map(str::trim_end)
        .find(|l| !l.is_empty())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_person_at_a_terminal_chats_stops_an_answer_and_leaves() {
    if tmux_missing() {
        return;
    }
    let env = keeper_env();
    // Slow enough that an answer of 1,500 tokens is still streaming when Ctrl-C comes.
    let model = slow_model();
    let tmux = chat_in_tmux(
        &env,
        &env.root.join("tmux.sock"),
        &["--model", model.to_str().unwrap(), "--max-tokens", "1500"],
    );
    tmux.until(&env, "the prompt", |s| last_line(s) == ">>>")
        .await;

    tmux.keys(&["Tell me a story", "Enter"]);
    // Streamed: text after the question while the answer is not finished (no prompt yet).
    let streaming = tmux
        .until(&env, "the answer's first words", |s| {
            let after = s.split(">>> Tell me a story").nth(1).unwrap_or_default();
            let answer: String = after.lines().skip(1).filter(|l| !is_progress(l)).collect();
            answer.trim().len() >= 20 && !after.contains(">>>")
        })
        .await;
    assert!(!streaming.contains("answer stopped"), "{streaming}");

    tmux.keys(&["C-c"]);
    let stopped = tmux
        .until(&env, "the prompt after Ctrl-C", |s| {
            s.contains("answer stopped; this turn is not kept") && last_line(s) == ">>>"
        })
        .await;
    assert!(!stopped.contains("chat exited"), "{stopped}");
    // The worker stopped generating too: its slot is free again.
    let started = Instant::now();
    loop {
        let workers = env.queen_json("/v1/workers").await;
        let worker = &workers["workers"][0];
        if worker["slots_free"] == worker["slots_total"] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the worker still generates after Ctrl-C: {workers}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    tmux.keys(&["/exit", "Enter"]);
    tmux.until(&env, "the exit", |s| s.contains("chat exited with 0"))
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn ctrl_c_at_the_prompt_leaves_a_terminal_chat() {
    if tmux_missing() {
        return;
    }
    let env = keeper_env();
    let model = tiny_model();
    let tmux = chat_in_tmux(
        &env,
        &env.root.join("tmux.sock"),
        &["--model", model.to_str().unwrap(), "--max-tokens", "8"],
    );
    tmux.until(&env, "the prompt", |s| last_line(s) == ">>>")
        .await;
    tmux.keys(&["Hello", "Enter"]);
    tmux.until(&env, "the next prompt", |s| {
        s.split(">>> Hello")
            .nth(1)
            .is_some_and(|after| after.contains(">>>"))
    })
    .await;
    tmux.keys(&["C-c"]);
    tmux.until(&env, "the exit", |s| s.contains("chat exited with 0"))
        .await;
}

/// A line of the keeper's progress display (drawn on stderr, which shares the pane).
fn is_progress(line: &str) -> bool {
    line.trim_start()
        .starts_with(['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'])
}
