//! `infer`: one generation through the queen, auto-starting a local cluster when needed.

use std::io::Read;
use std::time::Instant;

use rbee_contract::{ChatMessage, ChatRole, FinishReason, InferRequest};

use crate::cli::{InferArgs, SamplingArgs};
use crate::commands::cluster::ensure_cluster;
use crate::commands::{Ctx, infer_and_follow, resolve_model, until_interrupted};
use crate::error::KeeperError;

pub(crate) async fn infer(ctx: &mut Ctx<'_>, args: InferArgs) -> Result<(), KeeperError> {
    let request = build_request(&args, ctx.queen.url().is_local())?;
    let chat = request.messages.is_some();
    let interrupt = ctx.interrupt.clone();
    until_interrupted(&interrupt, ensure_cluster(ctx)).await?;

    let submitted_at = Instant::now();
    let end = infer_and_follow(ctx, request).await?;
    let ended_at_once = end.finish_reason == FinishReason::Stop
        && end.usage.is_some_and(|usage| usage.completion_tokens <= 1);
    if ended_at_once && !ctx.console.json() {
        // Otherwise the only output is nothing at all, which looks like a failure.
        let hint = if chat {
            ""
        } else {
            "; an instruct model may answer with --chat"
        };
        ctx.console.note(&format!(
            "the model ended its answer at once, without text{hint}"
        ));
    }
    if let Some(usage) = end.usage {
        let mut summary = format!(
            "{} prompt tokens, {} generated",
            usage.prompt_tokens, usage.completion_tokens
        );
        if let Some(first) = end.first_token {
            let generating = first.elapsed().as_secs_f64();
            if usage.completion_tokens > 1 && generating > 0.0 {
                summary.push_str(&format!(
                    " at {:.1} tokens/s",
                    f64::from(usage.completion_tokens - 1) / generating
                ));
            }
            summary.push_str(&format!(
                "; first token after {:.1}s",
                (first - submitted_at).as_secs_f64()
            ));
        }
        let reason = match end.finish_reason {
            FinishReason::Stop => "stopped",
            FinishReason::Length => "reached the token limit",
            FinishReason::Complete => "complete",
        };
        ctx.console.summary(&format!("{summary} ({reason})"));
    }
    Ok(())
}

/// The request as the queen gets it: the model resolved, the prompt read, chat or raw.
fn build_request(args: &InferArgs, queen_is_local: bool) -> Result<InferRequest, KeeperError> {
    let prompt = if args.prompt == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|e| KeeperError::io("cannot read the prompt from stdin", e))?;
        text
    } else {
        args.prompt.clone()
    };
    if prompt.trim().is_empty() {
        return Err(KeeperError::Usage("the prompt is empty".into()));
    }
    let model = resolve_model(&args.model, queen_is_local)?;
    let chat = args.chat || args.system.is_some();
    let (prompt, messages) = if chat {
        let mut messages = Vec::new();
        if let Some(system) = &args.system {
            messages.push(ChatMessage::new(ChatRole::System, system.clone()));
        }
        messages.push(ChatMessage::new(ChatRole::User, prompt));
        (None, Some(messages))
    } else {
        (Some(prompt), None)
    };
    Ok(InferRequest {
        model,
        prompt,
        messages,
        ..sampled(&args.sampling)
    })
}

/// A request with the sampling flags set and nothing else.
pub(crate) fn sampled(sampling: &SamplingArgs) -> InferRequest {
    InferRequest {
        max_tokens: sampling.max_tokens,
        temperature: sampling.temperature,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        seed: sampling.seed,
        stop: sampling.stop.clone(),
        ..InferRequest::default()
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    fn args(argv: &[&str]) -> InferArgs {
        let cli = Cli::try_parse_from(
            ["rbee-keeper", "infer"]
                .into_iter()
                .chain(argv.iter().copied()),
        )
        .unwrap();
        match cli.command {
            Command::Infer(args) => args,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn raw_prompts_and_sampling() {
        let request = build_request(
            &args(&[
                "-m",
                "hf:o/r",
                "--max-tokens",
                "16",
                "--temperature",
                "0",
                "Hi",
            ]),
            true,
        )
        .unwrap();
        assert_eq!(request.prompt.as_deref(), Some("Hi"));
        assert_eq!(request.messages, None);
        assert_eq!(request.max_tokens, Some(16));
        assert_eq!(request.temperature, Some(0.0));
    }

    #[test]
    fn a_system_message_makes_a_chat() {
        let request =
            build_request(&args(&["-m", "hf:o/r", "--system", "Be brief", "Hi"]), true).unwrap();
        assert_eq!(request.prompt, None);
        let messages = request.messages.unwrap();
        assert_eq!(messages.len(), 2);
        assert_eq!(messages[0].role, ChatRole::System);
        assert_eq!(messages[1].content, "Hi");
    }

    #[test]
    fn empty_prompts_are_usage_errors() {
        let err = build_request(&args(&["-m", "hf:o/r", "  "]), true).unwrap_err();
        assert_eq!(err.exit_code(), 2);
    }
}
