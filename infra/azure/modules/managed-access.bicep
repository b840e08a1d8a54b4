// Contributor on the resource group the broker provisions into: it creates,
// changes and deletes the resources it is asked for there, and nothing
// elsewhere. Deployed at that group's scope by main.bicep.

targetScope = 'resourceGroup'

@description('The broker\'s managed identity (its principal id).')
param principalId string

var contributor = 'b24988ac-6180-42a0-ab88-20f7382dd24c'

resource access 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(resourceGroup().id, principalId, contributor)
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', contributor)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}
