//! Code runs for the native API: a sandbox's code interpreter (the service the
//! `code-interpreter-v1` template starts on [`INTERPRETER_PORT`]), reached with the
//! sandbox's access token like its agent.

use super::SandboxManager;
use crate::agent::interpreter::{
    CodeContext, CodeEvents, CodeRun, InterpreterClient, NewCodeContext, INTERPRETER_PORT,
};
use crate::error::{Error, Result};
use crate::labels;
use crate::types::SandboxId;

impl SandboxManager {
    /// A client of sandbox `id`'s code interpreter. A paused sandbox is a
    /// [`Error::Conflict`]; one without an interpreter answers so on first use.
    pub async fn interpreter(&self, id: &SandboxId) -> Result<InterpreterClient> {
        let token = self.agent(id).await?.token().to_string();
        let addr = self
            .inner
            .backend
            .agent_address(&labels::container_name(id), INTERPRETER_PORT)
            .await?;
        Ok(InterpreterClient::new(
            self.inner.http.clone(),
            addr.addr,
            token,
        ))
    }

    /// The code contexts of sandbox `id`.
    pub async fn code_contexts(&self, id: &SandboxId) -> Result<Vec<CodeContext>> {
        self.interpreter(id).await?.contexts().await
    }

    /// Creates a code context in sandbox `id`.
    pub async fn create_code_context(
        &self,
        id: &SandboxId,
        new: &NewCodeContext,
    ) -> Result<CodeContext> {
        self.interpreter(id).await?.create_context(new).await
    }

    /// Removes code context `context` of sandbox `id`.
    pub async fn remove_code_context(&self, id: &SandboxId, context: &str) -> Result<()> {
        self.interpreter(id).await?.remove_context(context).await
    }

    /// Restarts code context `context` of sandbox `id`: its state is gone.
    pub async fn restart_code_context(&self, id: &SandboxId, context: &str) -> Result<()> {
        self.interpreter(id).await?.restart_context(context).await
    }

    /// Runs code in sandbox `id`; the events stream as they come, and dropping them
    /// interrupts the run.
    pub async fn run_code(&self, id: &SandboxId, run: &CodeRun) -> Result<CodeEvents> {
        if run.context_id.is_some() && run.language.is_some() {
            return Err(Error::InvalidArgument(
                "give a context or a language, not both".into(),
            ));
        }
        self.interpreter(id).await?.run(run).await
    }
}
