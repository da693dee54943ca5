//! The prompt that tells an external model which context files to read and
//! how to cite them. Built in; `--prompt-template FILE` overrides it. The
//! placeholders `{files}`, `{question}`, `{context_version}` and `{example}`
//! are replaced.

use super::citations::FileLines;

/// The built-in template.
pub const DEFAULT: &str = "You are a memory shard: you answer questions from the context files below, and from nothing else.

Context files (context version {context_version}):
{files}

Read the files you need. Cite every claim as FILE:START-END line ranges, with the file paths exactly as listed above (for example {example}). If the files do not answer the question, say so plainly and cite nothing. Answer briefly.

Question: {question}
";

/// A loaded template.
#[derive(Debug, Clone)]
pub struct Prompt {
    template: String,
}

impl Prompt {
    /// The built-in template, or the file's content.
    pub fn load(path: Option<&std::path::Path>) -> Result<Prompt, String> {
        let template = match path {
            None => DEFAULT.to_string(),
            Some(p) => std::fs::read_to_string(p)
                .map_err(|e| format!("prompt template {}: {e}", p.display()))?,
        };
        if !template.contains("{question}") {
            return Err("the prompt template has no {question} placeholder".into());
        }
        Ok(Prompt { template })
    }

    /// Fill in the placeholders.
    pub fn render(&self, question: &str, files: &[FileLines], version: &str) -> String {
        let list: String = files
            .iter()
            .map(|f| format!("- {} ({} lines)\n", f.display, f.lines))
            .collect();
        let example = files
            .first()
            .map(|f| format!("{}:1-{}", f.display, f.lines.clamp(1, 12)))
            .unwrap_or_else(|| "NOTES.md:3-9".into());
        self.template
            .replace("{files}", list.trim_end())
            .replace("{context_version}", version)
            .replace("{example}", &example)
            .replace("{question}", question)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_files_question_and_example() {
        let p = Prompt::load(None).unwrap();
        let files = vec![FileLines {
            display: "docs/A.md".into(),
            lines: 40,
        }];
        let text = p.render("Why?", &files, "sha256:ab");
        assert!(text.contains("- docs/A.md (40 lines)"));
        assert!(text.contains("docs/A.md:1-12"));
        assert!(text.contains("Question: Why?"));
        assert!(text.contains("sha256:ab"));
        assert!(!text.contains('{'));
    }

    #[test]
    fn a_template_needs_the_question() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("t.txt");
        std::fs::write(&f, "no placeholder").unwrap();
        assert!(Prompt::load(Some(&f)).is_err());
        std::fs::write(&f, "Q: {question}").unwrap();
        assert_eq!(
            Prompt::load(Some(&f)).unwrap().render("x", &[], "v"),
            "Q: x"
        );
    }
}
