//! Which token ids end a generation, by llama.cpp's rules (`special_eog_ids` in its
//! `llama-vocab.cpp`), so that a file stops where llama.cpp stops it.
//!
//! A file declares one EOS id, but chat fine-tunes end their turns with a sibling (`<|eot_id|>`,
//! `<|im_end|>`, `<end_of_turn>`, `<|end|>`) and converters do not always declare it. So, as in
//! llama.cpp, the set is: the declared EOS, EOT and EOM ids, the fill-in-the-middle padding,
//! repository and file-separator tokens (declared or found by their text), and every vocabulary
//! token whose text is one of the usual end-of-turn texts, whatever its type.

use std::collections::BTreeSet;

/// Texts of tokens that end a turn or a document in common model families.
const END_OF_GENERATION_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<|return|>",
    "<|call|>",
    "<|flush|>",
    "<|calls|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "[EOS]",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<eos>",
    "<turn|>",
    "<|tool_response>",
    "<｜end▁of▁sentence｜>",
    "[e~[",
];

/// Texts of an end-of-turn token, for files that do not declare their EOT id; the first one
/// the vocabulary has is taken.
const END_OF_TURN_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|end_of_text|>",
    "<EOT>",
    "_<EOT>",
    "[EOT]",
    "<｜end▁of▁sentence｜>",
    "<end_of_utterance>",
];

/// Fill-in-the-middle tokens that end a generation (padding, repository name, file
/// separator), each found by the first of its texts the vocabulary has when not declared.
const FIM_PAD_TEXTS: &[&str] = &["<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"];
const FIM_REP_TEXTS: &[&str] = &[
    "<|fim_repo|>",
    "<|repo_name|>",
    "<fim-repo>",
    "<REPO>",
    "<reponame>",
];
const FIM_SEP_TEXTS: &[&str] = &["<|file_sep|>"];

/// End-of-generation ids a file declares in its metadata.
#[derive(Debug, Default, Clone)]
pub(super) struct Declared {
    pub eot: Option<u32>,
    pub eom: Option<u32>,
    pub fim_pad: Option<u32>,
    pub fim_rep: Option<u32>,
    pub fim_sep: Option<u32>,
    /// Further ids listed as ending generation (`generation_config.json`'s `eos_token_id`).
    pub others: Vec<u32>,
}

/// Every id that ends generation, `eos` first, then EOT and EOM, then the others in id order.
/// `id_of` looks a token up by its text in the whole vocabulary; `text_of` is the reverse.
pub(super) fn end_of_generation_ids(
    eos: Option<u32>,
    declared: &Declared,
    id_of: impl Fn(&str) -> Option<u32>,
    text_of: impl Fn(u32) -> Option<String>,
) -> Vec<u32> {
    let first_present = |texts: &[&str]| texts.iter().find_map(|t| id_of(t));
    let eot = declared.eot.or_else(|| first_present(END_OF_TURN_TEXTS));
    let eom = declared.eom.or_else(|| id_of("<|eom_id|>"));

    let mut rest: BTreeSet<u32> = BTreeSet::new();
    rest.extend(declared.fim_pad.or_else(|| first_present(FIM_PAD_TEXTS)));
    rest.extend(declared.fim_rep.or_else(|| first_present(FIM_REP_TEXTS)));
    rest.extend(declared.fim_sep.or_else(|| first_present(FIM_SEP_TEXTS)));
    rest.extend(declared.others.iter().copied());
    rest.extend(END_OF_GENERATION_TEXTS.iter().filter_map(|t| id_of(t)));

    let mut ids: Vec<u32> = Vec::new();
    for id in [eos, eot, eom].into_iter().flatten().chain(rest) {
        if !ids.contains(&id) {
            ids.push(id);
        }
    }

    let text = |id: u32| text_of(id).unwrap_or_default();
    let texts: Vec<String> = ids.iter().map(|&id| text(id)).collect();
    let has = |wanted: &[&str]| texts.iter().any(|t| wanted.contains(&t.as_str()));
    // gpt-oss (harmony) and solar-open end a message with `<|end|>` but keep generating after
    // it; their real ends are `<|return|>` and `<|call|>` (`<|calls|>` and `<|flush|>`).
    let harmony = (has(&["<|return|>"]) && has(&["<|call|>", "<|calls|>"]))
        || (has(&["<|call|>", "<|calls|>"]) && has(&["<|flush|>"]));
    // Vocabularies with these markers use `</s>` as ordinary text.
    let plain_s = has(&["<|tool_response>", "<|plamo:eos|>"]);
    ids.retain(|&id| {
        let t = text(id);
        !(harmony && t == "<|end|>" || plain_s && t == "</s>")
    });
    ids
}
