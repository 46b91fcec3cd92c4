//! Renders chat messages into prompt text with the model's own Jinja chat template
//! (GGUF `tokenizer.chat_template`), the way Hugging Face `apply_chat_template` does.
//!
//! Models without a template get plain ChatML.
use minijinja::{context, Environment, Error as JinjaError, ErrorKind, Value};

use crate::{EngineError, Message, Result};

/// ChatML, used when the GGUF carries no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}\
{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}\
{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Roles a request may use.
const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// Renders `messages` and opens the assistant's turn (`add_generation_prompt=true`).
/// `bos`/`eos` are the token texts templates may reference (`""` when the model has none).
///
/// Errors: `InvalidRequest` for an unknown role, no messages, or a template that rejects the
/// conversation (`raise_exception`); `Tokenizer` when the model's template does not parse.
pub fn render_chat(template: Option<&str>, messages: &[Message], bos: &str, eos: &str) -> Result<String> {
    if messages.is_empty() {
        return Err(EngineError::InvalidRequest("a chat prompt needs at least one message".into()));
    }
    if let Some(m) = messages.iter().find(|m| !ROLES.contains(&m.role.as_str())) {
        return Err(EngineError::InvalidRequest(format!(
            "message role {:?} is not one of system, user, assistant",
            m.role
        )));
    }
    let env = environment();
    let tmpl = env
        .template_from_str(template.unwrap_or(CHATML_TEMPLATE))
        .map_err(|e| EngineError::Tokenizer(format!("the model's chat template does not parse: {e:#}")))?;
    let messages: Value =
        messages.iter().map(|m| context! { role => m.role.as_str(), content => m.content.as_str() }).collect();
    let ctx = context! { messages, add_generation_prompt => true, bos_token => bos, eos_token => eos };
    tmpl.render(ctx)
        .map_err(|e| EngineError::InvalidRequest(format!("the model's chat template rejected these messages: {e}")))
}

/// A Jinja environment configured like transformers' chat-template sandbox.
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    // transformers renders with trim_blocks and lstrip_blocks on.
    env.set_syntax(
        minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("default delimiters are valid"),
    );
    // Python string/dict methods (`.strip()`, `.startswith()`, `.items()`) used by Qwen templates.
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, JinjaError> {
        Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
    });
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-135M-Instruct's `tokenizer.chat_template`, copied from its GGUF metadata
    /// (the tokenizer tests render the real file's template too).
    const SMOLLM2_TEMPLATE: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    fn msg(role: &str, content: &str) -> Message {
        Message { role: role.into(), content: content.into() }
    }

    #[test]
    fn smollm2_one_user_message_adds_default_system_prompt() {
        let out = render_chat(Some(SMOLLM2_TEMPLATE), &[msg("user", "What is 2+2?")], "<|im_start|>", "<|im_end|>");
        assert_eq!(
            out.unwrap(),
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n\
             <|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn smollm2_multi_turn_with_own_system_prompt() {
        let msgs = [msg("system", "Be brief."), msg("user", "Hi"), msg("assistant", "Hello!"), msg("user", "Bye\n")];
        let out = render_chat(Some(SMOLLM2_TEMPLATE), &msgs, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
             <|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye\n<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn fallback_is_plain_chatml() {
        let out = render_chat(None, &[msg("user", "Hi"), msg("assistant", "Yo"), msg("user", "ok")], "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo<|im_end|>\n\
             <|im_start|>user\nok<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn bad_roles_and_empty_are_invalid_requests() {
        for msgs in [vec![msg("tool", "x")], vec![msg("user", "a"), msg("User", "b")], vec![]] {
            match render_chat(None, &msgs, "", "") {
                Err(EngineError::InvalidRequest(m)) => assert!(m.contains("role") || m.contains("message"), "{m}"),
                other => panic!("{msgs:?}: expected InvalidRequest, got {other:?}"),
            }
        }
    }

    #[test]
    fn python_methods_raise_exception_and_special_tokens() {
        // Shapes of constructs that Qwen/Llama templates use.
        let t = "{{ bos_token }}{% for m in messages %}{% if m.role == 'assistant' and loop.first %}\
                 {{ raise_exception('Conversation must start with a user turn') }}{% endif %}\
                 {{ m.content.strip() | upper }}{% if m.content.startswith(' x') %}!{% endif %}{% endfor %}\
                 {{ eos_token }}";
        let ok = render_chat(Some(t), &[msg("user", " xy \n")], "<s>", "</s>").unwrap();
        assert_eq!(ok, "<s>XY!</s>");
        match render_chat(Some(t), &[msg("assistant", "a")], "", "") {
            Err(EngineError::InvalidRequest(m)) => assert!(m.contains("must start with a user turn"), "{m}"),
            other => panic!("expected InvalidRequest, got {other:?}"),
        }
        assert!(matches!(render_chat(Some("{% for %}"), &[msg("user", "a")], "", ""), Err(EngineError::Tokenizer(_))));
    }
}
