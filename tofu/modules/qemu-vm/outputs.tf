output "name" {
  description = "The VM name (metadata.name), unique within the project."
  value       = var.name
}

output "manifest" {
  description = "The QemuVM manifest as written to the state (nulls mean server defaults)."
  value       = terraform_data.vm.input
}
