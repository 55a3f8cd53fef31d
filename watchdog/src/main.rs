fn main() -> std::process::ExitCode {
    watchdog::cmd::main()
}
